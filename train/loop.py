"""The epoch loop every stage shares: resume, iterate, checkpoint, evaluate, report.

A stage describes itself with a `Stage` (its networks, optimisers, schedules, one training step and one
evaluation); `run_stage` does the rest the same way for the teacher, the paraphrasers and the student:

- resume from `last.pt` (same learning rate, same data order, same RNG draws, mid-epoch included), refusing a
  checkpoint made with other settings or from other teacher/paraphraser weights (`Stage.sources`);
- a tqdm bar per epoch on rank 0, `last.pt` every `save_every_iters` iterations and at each epoch end;
- `best.pt` whenever the validation score improves, written *before* the `last.pt` that points to it, so a
  crash between the two leaves a last.pt that redoes the epoch, never a finished one beside an older best.pt;
- `config.yaml` rewritten after every `last.pt`, so it always describes the checkpoint beside it (a failed
  --overwrite leaves both as they were);
- `summary.csv` after every epoch, `curves.png` at most every `curves_every_s` and after the last epoch, and
  `overlays_*.png`, in the stage's folder (rank 0 only); all redrawn from the checkpoints when a finished
  stage is skipped on resume.
"""
from __future__ import annotations

import math
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from cocofast.io import atomic_write_text
from cocofast.models import unwrap_model

from . import report
from .checkpoint import (CheckpointError, capture_rng, check_config, check_sources, load_checkpoint, model_entry,
                         restore_rng, save_checkpoint)
from .config import ConfigError, TrainConfig, dump_yaml
from .runtime import ResumableSampler, Runtime


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after_iters` debug switch: the run stops as if killed, without saving."""


LOG_EVERY = 10  # iterations between reads of the loss terms (the progress bar shows the last one read)


class PendingTerms:
    """The loss terms of the iterations not yet read: floats, or 0-dim tensors kept where a step computed them.

    Reading a device tensor's value waits until the device has run everything queued before it; read term by
    term, a student step stalled the device half a dozen times. They are read in one transfer every LOG_EVERY
    iterations, before each checkpoint, at the epoch's end and when a step raises.
    """

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def add(self, iteration: int, terms: dict) -> None:
        self.rows.append((iteration, {k: v.detach() if torch.is_tensor(v) else v for k, v in terms.items()}))

    def take(self) -> list[tuple[int, dict[str, float]]]:
        """(iteration, {term: value}) of every pending iteration, in order; none remain pending."""
        tensors = [v for _, terms in self.rows for v in terms.values() if torch.is_tensor(v)]
        values = iter(torch.stack([t.double().reshape(()) for t in tensors]).tolist() if tensors else ())
        rows = [(it, {k: next(values) if torch.is_tensor(v) else float(v) for k, v in terms.items()})
                for it, terms in self.rows]
        self.rows = []
        return rows


class IterationBudget:
    def __init__(self, limit: int):
        self.limit, self.done = limit, 0

    def tick(self) -> None:
        self.done += 1
        if self.limit and self.done >= self.limit:
            raise TrainingInterrupted(f"stopped after {self.done} iterations as asked (stop_after_iters); "
                                      f"continue with --resume")


@dataclass
class Stage:
    name: str
    out_dir: Path
    epochs: int
    # role -> (model_name, model_kwargs, module); every one is saved, the trained ones are also in `trained`.
    models: dict[str, tuple[str, dict, nn.Module]]
    trained: list[nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict
    scaler: torch.amp.GradScaler
    # (images, masks) or, from a keyed loader, (images, masks, keys=) -> {term: float or 0-dim tensor}
    train_step: Callable[..., dict]
    evaluate: Callable[[], dict[str, float]]
    score_key: str  # validation metric that picks best.pt
    higher_is_better: bool = True
    config_groups: tuple[str, ...] = ("all",)
    draw_overlays: Callable[[Path], None] | None = None
    extra: dict = field(default_factory=dict)  # stored as-is in the checkpoint (plain values only)
    # role -> network digest of the frozen networks this stage learns from (checkpoint.source_digests)
    sources: dict[str, str] = field(default_factory=dict)


def _better(score: float, best: float | None, higher: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(score)
    return score > best if higher else score < best


def run_stage(stage: Stage, cfg: TrainConfig, rt: Runtime, loader, sampler: ResumableSampler,
              budget: IterationBudget) -> None:
    last_path, best_path = stage.out_dir / "last.pt", stage.out_dir / "best.pt"
    per_rank_batch = cfg.batch_size // rt.world_size
    iters_per_epoch = sampler.num_samples // per_rank_batch
    wanted_config = cfg.group_items(stage.config_groups)

    epoch, batch_in_epoch, iteration = 0, 0, 0
    history: list[dict] = []
    meters: dict[str, list[float]] = {}
    pending = PendingTerms()
    best_score, best_epoch, run_id = None, None, uuid.uuid4().hex
    curves_drawn_at = -math.inf
    # Outputs of the run an --overwrite replaces; removed once the new run's first last.pt exists.
    stale = sorted(p for p in stage.out_dir.glob("*") if p.name in STAGE_OUTPUTS or p.match("overlays_*.png"))
    if last_path.exists() and not cfg.overwrite:
        if not cfg.resume:
            raise ConfigError(f"{last_path} exists: pass --resume to continue that run or --overwrite to "
                              f"start the {stage.name} stage afresh")
        ckpt = load_checkpoint(last_path)  # on CPU: RNG states must stay CPU tensors; weights are copied over
        check_config(ckpt["config"], wanted_config, last_path)
        check_sources(ckpt.get("sources"), stage.sources, last_path, finished=bool(ckpt.get("finished")))
        if ckpt.get("finished"):
            _log(rt, f"[{stage.name}] already finished ({last_path}); skipping")
            best = check_best_matches(ckpt, best_path)
            if rt.is_main:
                redraw_reports(stage, cfg, ckpt, best)
            rt.barrier()
            return
        stale = []
        epoch, batch_in_epoch, iteration = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["iteration"]
        history, best_score = list(ckpt["history"]), ckpt["best_score"]
        best_epoch, run_id = ckpt.get("best_epoch"), ckpt.get("run_id", run_id)
        for role, (_, _, module) in stage.models.items():
            unwrap_model(module).load_state_dict(ckpt["models"][role]["state_dict"])
        for role, opt in stage.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][role])
        for role, sched in stage.schedulers.items():
            sched.load_state_dict(ckpt["schedulers"][role])
        if ckpt["scaler"] is not None:
            stage.scaler.load_state_dict(ckpt["scaler"])
        per_rank = ckpt["per_rank"]
        if len(per_rank) != rt.world_size:
            warnings.warn(f"{last_path} was written by {len(per_rank)} processes, now {rt.world_size}: "
                          f"the resumed run will not be bit-identical to an uninterrupted one")
        mine = per_rank[rt.rank % len(per_rank)]
        meters = {k: list(v) for k, v in mine["meters"].items()}
        restore_rng(mine["rng"])
        _log(rt, f"[{stage.name}] resuming {last_path} at epoch {epoch + 1}, batch {batch_in_epoch}, "
                 f"iteration {iteration}")

    def checkpoint(path: Path, finished: bool = False) -> None:
        # Every rank's RNG and running sums go in, so each rank can continue exactly; only rank 0 writes.
        per_rank = rt.gather_objects({"rng": capture_rng(), "meters": meters})
        if not rt.is_main:
            return
        if path == best_path and best_path in stale:
            stale.remove(best_path)  # replaced by this run's own
        save_checkpoint(
            path, stage=stage.name,
            models={role: model_entry(n, kw, m) for role, (n, kw, m) in stage.models.items()},
            optimizers={role: opt.state_dict() for role, opt in stage.optimizers.items()},
            schedulers={role: s.state_dict() for role, s in stage.schedulers.items()},
            scaler=stage.scaler.state_dict() if stage.scaler.is_enabled() else None,
            epoch=epoch, batch_in_epoch=batch_in_epoch, iteration=iteration, finished=finished,
            per_rank=per_rank, world_size=rt.world_size, config=cfg.to_dict(), history=history,
            best_score=best_score, best_epoch=best_epoch, run_id=run_id, sources=dict(stage.sources),
            **stage.extra)
        if path == last_path:
            atomic_write_text(dump_yaml(cfg), stage.out_dir / "config.yaml")
            while stale:
                stale.pop().unlink(missing_ok=True)

    def read_terms(bar) -> None:
        """Fold the pending iterations' terms into the meters, refusing the first that is not finite."""
        rows = pending.take()
        for it, terms in rows:
            if not all(math.isfinite(v) for v in terms.values()):
                raise FloatingPointError(
                    f"[{stage.name}] a loss is not finite at epoch {epoch + 1}, iteration {it}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                    + "; lower the learning rate (or use --amp=off) and resume from the last good checkpoint")
            for key, value in terms.items():
                total = meters.setdefault(key, [0.0, 0.0])
                total[0] += value
                total[1] += 1
        if rows:
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(rows[-1][1].items())[:4]})

    if rt.is_main:
        stage.out_dir.mkdir(parents=True, exist_ok=True)
    while epoch < stage.epochs:
        sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):  # augmentation drawn from (seed, epoch, index)
            loader.dataset.set_epoch(epoch)
        sampler.start_at(batch_in_epoch * per_rank_batch)
        for module in stage.trained:
            module.train()
        started = time.perf_counter()
        bar = tqdm(total=iters_per_epoch, initial=batch_in_epoch, leave=False, dynamic_ncols=True,
                   desc=f"{stage.name} {epoch + 1}/{stage.epochs}", disable=not (rt.is_main and cfg.progress))
        for batch in loader:
            images = batch[0].to(rt.device, non_blocking=True)
            masks = batch[1].to(rt.device, non_blocking=True)
            # A keyed training set (train/teacher_cache.py) adds each sample's cache key; it stays on the CPU.
            keyed = {"keys": batch[2]} if len(batch) > 2 else {}
            try:
                pending.add(iteration + 1, stage.train_step(images, masks, **keyed))
                iteration += 1
                batch_in_epoch += 1
                bar.update(1)
                if batch_in_epoch % LOG_EVERY == 1 or batch_in_epoch == iters_per_epoch:
                    read_terms(bar)
                budget.tick()
            except Exception:
                # An earlier iteration's non-finite loss, if any, is the cause to report: it spoilt the weights.
                read_terms(bar)
                raise
            if cfg.save_every_iters and iteration % cfg.save_every_iters == 0 and batch_in_epoch < iters_per_epoch:
                read_terms(bar)  # a checkpoint holds no iteration whose loss was not finite
                checkpoint(last_path)
        read_terms(bar)
        bar.close()

        # Epoch end: average the loss terms over every rank's batches, sync BN statistics, validate.
        keys = sorted(meters)
        sums = rt.all_reduce_sum(torch.tensor([meters[k][0] for k in keys] + [meters[k][1] for k in keys],
                                              dtype=torch.float64))
        row: dict = {"epoch": epoch + 1, "iteration": iteration}
        row.update({k: sums[i].item() / max(sums[len(keys) + i].item(), 1) for i, k in enumerate(keys)})
        row.update({f"lr_{role}": s.last_lr for role, s in stage.schedulers.items()})
        for module in stage.trained:
            rt.broadcast_buffers(module)
        row.update(stage.evaluate())
        row["epoch_seconds"] = time.perf_counter() - started
        history.append(row)
        epoch, batch_in_epoch, meters = epoch + 1, 0, {}
        improved = _better(row[stage.score_key], best_score, stage.higher_is_better)
        if improved:
            best_score, best_epoch = row[stage.score_key], epoch
            checkpoint(best_path)
        checkpoint(last_path, finished=epoch == stage.epochs)
        if rt.is_main:
            # Drawing the curves costs about a second: in short runs of seconds-long epochs it was a fifth of
            # the wall time, so they are redrawn at most every curves_every_s, and always after the last epoch.
            draw = epoch == stage.epochs or time.perf_counter() - curves_drawn_at >= cfg.curves_every_s
            write_reports(stage, cfg, history, curves=draw)
            if draw:
                curves_drawn_at = time.perf_counter()
            if stage.draw_overlays is not None and cfg.num_overlays:
                stage.draw_overlays(stage.out_dir / "overlays_last.png")
                if improved:
                    stage.draw_overlays(stage.out_dir / "overlays_best.png")
        shown = " ".join(f"{k}={row[k]:.4g}" for k in row if k.startswith(("loss", "val_")))
        _log(rt, f"[{stage.name}] epoch {epoch}/{stage.epochs} {shown} ({row['epoch_seconds']:.1f} s)"
                 + ("  * best" if improved else ""))
    rt.barrier()


STAGE_OUTPUTS = ("best.pt", "summary.csv", "curves.png")


def write_reports(stage: Stage, cfg: TrainConfig, history: list[dict], curves: bool = True) -> None:
    report.write_summary(history, stage.out_dir / "summary.csv")
    if curves:
        report.plot_curves(history, stage.out_dir / "curves.png", title=f"{stage.name} ({cfg.run_dir})")


def check_best_matches(last: dict, best_path: Path) -> dict | None:
    """best.pt of a finished stage, refused unless it is the one its last.pt names (same run, same epoch)."""
    if last.get("best_epoch") is None or "run_id" not in last:
        return None  # nothing recorded to check against (no epoch improved, or an older checkpoint)
    if not best_path.is_file():
        raise CheckpointError(f"{best_path} is missing, but {best_path.parent / 'last.pt'} says epoch "
                              f"{last['best_epoch']} was the best; use --overwrite to train this stage again")
    best = load_checkpoint(best_path)
    found = (best.get("run_id"), best.get("epoch"))
    if found != (last["run_id"], last["best_epoch"]):
        raise CheckpointError(f"{best_path} does not belong to {best_path.parent / 'last.pt'}: it is from epoch "
                              f"{found[1]} of run {str(found[0])[:8]}, the last.pt names epoch {last['best_epoch']} "
                              f"of run {last['run_id'][:8]} (an interrupted write); use --overwrite to train this "
                              f"stage again")
    return best


def redraw_reports(stage: Stage, cfg: TrainConfig, last: dict, best: dict | None) -> None:
    """The summary, curves and overlays of a stage skipped as finished, from its checkpoints."""
    write_reports(stage, cfg, list(last["history"]))
    if stage.draw_overlays is None or not cfg.num_overlays:
        return
    for name, ckpt in (("overlays_best.png", best), ("overlays_last.png", last)):
        if ckpt is None:
            continue
        for role, (_, _, module) in stage.models.items():
            unwrap_model(module).load_state_dict(ckpt["models"][role]["state_dict"])
        stage.draw_overlays(stage.out_dir / name)


def _log(rt: Runtime, message: str) -> None:
    if rt.is_main:
        print(message, flush=True)
