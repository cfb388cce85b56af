"""Process-level set-up: distributed group, device, mixed precision, seeding, data loaders.

One `Runtime` object carries what every stage needs to know about where it runs. With torchrun it joins the
process group (nccl on CUDA, gloo on CPU); as a plain `python` process it is a world of one.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cocofast.cpu_memory import keep_freed_memory

from .config import ConfigError, TrainConfig


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler is a pass-through with the same interface.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def wrap(self, module: nn.Module, sync_buffers_each_forward: bool = True) -> nn.Module:
        """DDP for a module this stage trains; a frozen network is never passed here.

        Buffers are always synced from rank 0 once at wrapping; `sync_buffers_each_forward=False` skips the
        per-forward broadcast too (torch renamed that switch from broadcast_buffers to forward_sync_buffers).
        """
        if not self.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        kwargs = {}
        if not sync_buffers_each_forward:
            params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
            kwargs = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, **kwargs)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP broadcasts buffers at the start of each forward, but each rank then updates its own running stats
        with its own batch; syncing after an epoch makes evaluation and the saved weights rank-independent.
        """
        if self.distributed:
            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_runtime(cfg: TrainConfig) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config key 'device': 'cuda' asked for but no CUDA device is available")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif want == "cpu":
        device = torch.device("cpu")
    else:
        raise ConfigError(f"config key 'device': expected 'auto', 'cpu' or 'cuda', got {cfg.device!r}")
    torch.set_num_threads(cpu_threads(cfg.threads, world_size, device))
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()  # before the first step's allocations; does nothing off glibc
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world_size:
        raise ConfigError(f"config key 'batch_size': {cfg.batch_size} does not split evenly over "
                          f"{world_size} processes")
    return Runtime(rank, world_size, local_rank, device, amp_dtype(cfg.amp, device))


def cpu_threads(threads: int, world_size: int, device: torch.device) -> int:
    """The `threads` key resolved: as given; else 1 per process for CPU training under torchrun (several
    processes each with every core oversubscribe the machine several times over); else what OMP_NUM_THREADS
    says, where it is set; else every core."""
    if threads > 0:
        return threads
    if world_size > 1 and device.type == "cpu":
        return 1
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return os.cpu_count() or 1


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None  # CPU bf16 autocast works (amp=bf16) but is only faster on CPUs with bf16 matmul units
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'amp': fp16 autocast needs CUDA; use 'bf16' or 'off' on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(cfg: TrainConfig) -> None:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


# --- samplers and loaders --------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler whose order is a function of (seed, epoch) and which can start mid-epoch.

    `start_at(n)` skips the first n indices of this rank's share for the next pass only, so a run resumed after
    k batches sees exactly the batches an uninterrupted run would have seen next.
    """

    def __init__(self, dataset: Dataset, rt: Runtime, seed: int):
        super().__init__(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed,
                         drop_last=False)
        self._skip = 0

    def start_at(self, n_indices: int) -> None:
        self._skip = n_indices

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self._skip:]
        self._skip = 0
        return iter(indices)


class ShardSampler(Sampler[int]):
    """Every index exactly once over all ranks (no padding), in order: for exact all-reduced metrics."""

    def __init__(self, length: int, rt: Runtime):
        self.indices = list(range(rt.rank, length, rt.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_loader(dataset: Dataset, cfg: TrainConfig, rt: Runtime, sampler=None):
    """(loader, sampler); the sampler defaults to a ResumableSampler over the whole set."""
    per_rank = cfg.batch_size // rt.world_size
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f"training set has {len(dataset)} samples, fewer than batch_size={cfg.batch_size}")
    sampler = sampler or ResumableSampler(dataset, rt, cfg.seed)
    # The loader gets its own generator: otherwise creating each epoch's iterator draws from the global torch
    # RNG, and a run resumed mid-epoch would draw at a different moment than the uninterrupted one.
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


def eval_loader(dataset: Dataset, cfg: TrainConfig, rt: Runtime) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.eval_batch_size, sampler=ShardSampler(len(dataset), rt),
                      num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda",
                      persistent_workers=cfg.num_workers > 0)
