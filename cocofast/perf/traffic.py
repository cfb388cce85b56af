"""Count the memory traffic of cocofast's ops: Triton kernels in the CPU interpreter and eager torch ops, by
one set of rules.

    report = count_traffic(lambda: gram_stats(f1, f2))       # kernels and torch ops; needs TRITON_INTERPRET=1
    with TrafficCounter() as counter: eager_code()           # torch ops only, on any device; counter.report
    report.load_bytes, report.store_bytes                    # issued
    report.dram_bytes                                        # DRAM model
    for row in report.rows: row.kernel, row.tensor, row.loads, row.stores, ...

The rules, the same for a kernel launch and a torch op (each is one step a GPU runs):
- a step reads its inputs and writes its outputs. `issued` bytes are what it asks for; `dram` bytes count
  each distinct byte once per step (L2 serving every re-read within one launch).
- a Triton kernel: issued = every masked-in element of every tl.load / tl.store; dram = the distinct bytes
  of each tensor argument it touched. Masked-out elements move nothing.
- a torch op streams each operand from memory once, so issued = dram: it reads each distinct tensor
  argument once (x * x reads x once; an `out=` buffer is only written) and writes its results. Views and
  metadata queries move nothing, allocations nothing, fills only their writes; indexing reads only the
  indices and the values it gathers, index_put_ reads and writes only the values it scatters.
- the interpreter's own host copies around a kernel launch are not traffic.

Two figures for kernels, because a GPU is between them: `issued` is what the kernels ask for (L1/L2
requests); `dram` is the DRAM traffic when L2 serves every re-read within a launch. The kernels order their
grids so that the programs re-reading one row block (one per channel-tile pair) run side by side, which is
what makes the DRAM model the relevant one for the Gram path: a tiled GEMM has to re-read its operands
⌈C/tile⌉ times from somewhere (Hong & Kung's I/O bound for a register-sized tile), and L2 is where that
happens. Use `dram_bytes` for time = max(bytes / HBM bandwidth, FLOPs / peak) (cocofast.perf.roofline).

    python -m cocofast.perf.traffic     # forward and backward traffic as multiples of the minimum
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class TensorTraffic:
    """Bytes one kernel (or torch op) moved through one of its tensor arguments, summed over its launches."""

    kernel: str
    tensor: str
    loads: int = 0          # issued load bytes (masked-in elements × element size)
    stores: int = 0
    dram_loads: int = 0     # distinct bytes loaded, counted once per launch
    dram_stores: int = 0


@dataclass
class TrafficReport:
    rows: list[TensorTraffic] = field(default_factory=list)

    @property
    def load_bytes(self) -> int:
        return sum(r.loads for r in self.rows)

    @property
    def store_bytes(self) -> int:
        return sum(r.stores for r in self.rows)

    @property
    def issued_bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    @property
    def dram_bytes(self) -> int:
        return sum(r.dram_loads + r.dram_stores for r in self.rows)

    def by_kernel(self) -> dict[str, tuple[int, int]]:
        """kernel -> (issued bytes, DRAM-model bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for r in self.rows:
            i, d = out.get(r.kernel, (0, 0))
            out[r.kernel] = (i + r.loads + r.stores, d + r.dram_loads + r.dram_stores)
        return out


class _Launch:
    """Address ranges of one kernel launch's tensor arguments and the bytes touched in each."""

    def __init__(self, kernel: str, named: dict[str, torch.Tensor]):
        self.kernel = kernel
        self.ranges = []
        for name, t in named.items():
            storage = t.untyped_storage()
            start = storage.data_ptr()
            self.ranges.append((name, start, start + storage.nbytes()))
        self.rows = {name: TensorTraffic(kernel, name) for name, _, _ in self.ranges}
        self.touched = {name: (np.zeros(end - start, dtype=bool), np.zeros(end - start, dtype=bool))
                        for name, start, end in self.ranges}

    def record(self, addresses: np.ndarray, mask: np.ndarray, size: int, is_store: bool) -> None:
        addr = np.asarray(addresses, dtype=np.uint64).ravel()[np.broadcast_to(mask, np.shape(addresses)).ravel()]
        for name, start, end in self.ranges:
            inside = addr[(addr >= start) & (addr < end)]
            if inside.size == 0:
                continue
            row = self.rows[name]
            if is_store:
                row.stores += inside.size * size
            else:
                row.loads += inside.size * size
            offsets = (inside - np.uint64(start)).astype(np.int64)[:, None] + np.arange(size)[None, :]
            self.touched[name][int(is_store)][offsets.ravel()] = True

    def finish(self) -> list[TensorTraffic]:
        for name, (loaded, stored) in self.touched.items():
            self.rows[name].dram_loads = int(loaded.sum())
            self.rows[name].dram_stores = int(stored.sum())
        return [r for r in self.rows.values() if r.loads or r.stores]


# Metadata queries that are not views; allocations move nothing; fills only write (a tensor argument of
# theirs is a template for dtype and device); gathers and scatters move their indices and values only.
_METADATA = {"is_same_size", "_local_scalar_dense"}
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_FILLS = {"new_ones", "new_zeros", "new_full", "zeros_like", "ones_like", "full_like", "fill_", "zero_"}
_GATHERS = {"index"}
_SCATTERS = {"index_put_", "index_put"}


def _tensor_bytes(values) -> int:
    """Bytes of the distinct tensors among `values`: one op reading a tensor twice (x * x, or y and yᵀ in a
    Gram product) streams it from memory once."""
    seen = {(v.data_ptr(), v.numel() * v.element_size()) for v in tree_flatten(values)[0]
            if isinstance(v, torch.Tensor)}
    return sum(size for _, size in seen)


def torch_op_bytes(func, args, kwargs, result) -> tuple[int, int]:
    """(read, written) bytes of one torch op by the rules above."""
    name = func.overloadpacket.__name__
    if func.is_view or name in _METADATA or name in _ALLOCATIONS:
        return 0, 0
    reads = {k: v for k, v in kwargs.items() if k != "out"}
    if name in _FILLS:
        return 0, _tensor_bytes(result)
    if name in _GATHERS:
        return _tensor_bytes(args[1:]), _tensor_bytes(result)
    if name in _SCATTERS:
        moved = _tensor_bytes((args[1:], reads))
        return moved, moved
    return _tensor_bytes((args, reads)), _tensor_bytes(result)


class TrafficCounter(TorchDispatchMode):
    """`with TrafficCounter() as c: ...` counts every torch op run inside into `c.report` (one row per op);
    c.total_bytes, c.by_op {aten op name: bytes} and c.calls {aten op name: count} summarise it. While
    `paused` is set, ops are run but not counted (count_traffic sets it around the interpreter's launches)."""

    def __init__(self):
        super().__init__()
        self.report = TrafficReport()
        self.calls: dict[str, int] = defaultdict(int)
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.paused:
            name = func.overloadpacket.__name__
            read, written = torch_op_bytes(func, args, kwargs, result)
            self.calls[name] += 1
            if read or written:
                self.report.rows.append(TensorTraffic(f"torch.{name}", "inputs/outputs", loads=read,
                                                      stores=written, dram_loads=read, dram_stores=written))
        return result

    @property
    def total_bytes(self) -> int:
        return self.report.dram_bytes

    @property
    def by_op(self) -> dict[str, int]:
        return {kernel.removeprefix("torch."): dram for kernel, (_, dram) in self.report.by_kernel().items()}


def count_traffic(launch: Callable[[], object]) -> TrafficReport:
    """Run `launch()` (forward, backward, anything) with every kernel's and torch op's traffic counted
    (for eager torch code alone, on any device, TrafficCounter is enough).

    Needs the interpreter: set TRITON_INTERPRET=1 before cocofast's kernels are imported."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("count_traffic runs kernels in Triton's CPU interpreter: set TRITON_INTERPRET=1 "
                           "before importing cocofast.kernels")
    from triton.runtime import interpreter

    counter = TrafficCounter()
    report = counter.report
    current: list[_Launch | None] = [None]
    builder = interpreter.InterpreterBuilder
    real_load, real_store = builder.create_masked_load, builder.create_masked_store
    real_call, real_init = interpreter.GridExecutor.__call__, interpreter.GridExecutor._init_args_hst

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if current[0] is not None:
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            current[0].record(ptrs.data, mask.data, size, is_store=False)
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        if current[0] is not None:
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            current[0].record(ptrs.data, mask.data, size, is_store=True)
        return real_store(self, ptrs, value, mask, cache_policy)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = real_init(self, args_dev, kwargs)
        names = self.fn.__code__.co_varnames[:self.fn.__code__.co_argcount]
        named = dict(zip(names, args_hst))
        named.update(kwargs_hst)
        current[0] = _Launch(self.fn.__name__, {k: v for k, v in named.items() if isinstance(v, torch.Tensor)})
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        counter.paused = True  # the interpreter's own host copies are not kernel traffic
        try:
            return real_call(self, *args, **kwargs)
        finally:
            if current[0] is not None:
                report.rows.extend(current[0].finish())
            current[0] = None
            counter.paused = False

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    interpreter.GridExecutor.__call__, interpreter.GridExecutor._init_args_hst = call, init_args
    try:
        with counter:
            launch()
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store
        interpreter.GridExecutor.__call__, interpreter.GridExecutor._init_args_hst = real_call, real_init
    return report


# ------------------------------------------------------------------------------------------ the table


def map_bytes(*maps: torch.Tensor) -> int:
    return sum(m.numel() * m.element_size() for m in maps)


PATHS = ("triton", "tiled", "pixel_relation")  # "gram" is accepted for "triton" (its old name here)


def path_traffic(path: str, c1: int, c2: int, side: int = 32, dtype=torch.float32, mix: bool = True) -> dict:
    """Forward and backward traffic of one kernel path on (1, C, side, side) maps, in bytes and as multiples
    of the minimum: each map read once forward; read once and its gradient written once backward.

    For the N×N walks (tiled, pixel_relation) a second minimum is set by the walk itself: a program owns a
    block of BLOCK_I rows and must stream the other side's rows (both maps, all channels) past it, so

        walk minimum, forward  = ⌈N/BLOCK_I⌉ · (|F₁| + |F₂|)
        walk minimum, backward = Σ over maps s with a gradient of ⌈C_s/BLOCK_D⌉ · ⌈N/BLOCK_I⌉ · (|F₁| + |F₂|)
                                 + |dF_s|      (one program per output-channel tile BLOCK_D as well)

    bytes the kernels must *issue* (from L2 when the grid keeps a row block's programs together); their
    issued bytes are reported against it (`walk_multiple`). For the Gram path it is the plain minimum."""
    from cocofast.kernels.gram import gram_stats
    from cocofast.kernels.launcher import tile_walk_config
    from cocofast.kernels.pixel_relation import pixel_relation_rows, pixel_tiles
    from cocofast.kernels.tiled import tiled_stats

    path = "triton" if path == "gram" else path
    torch.manual_seed(0)
    f1 = torch.randn(1, c1, side, side, dtype=dtype, requires_grad=True)
    f2 = torch.randn(1, c2, side, side, dtype=dtype, requires_grad=True)
    n_pix = side * side
    if path == "pixel_relation":  # the teacher (f1) is a constant: no gradient, so no dF₁ to write
        run = lambda: pixel_relation_rows(f1.detach(), f2, 1.0, mix)  # noqa: E731
        grads = map_bytes(f2)
        blocks = -(-n_pix // pixel_tiles(n_pix))
        walk_fwd = blocks * map_bytes(f1, f2)
        walk_bwd = -(-c2 // tile_walk_config(n_pix, c2).block_out) * blocks * map_bytes(f1, f2) + grads
    else:
        stats = {"triton": gram_stats, "tiled": tiled_stats}[path]
        run = lambda: sum(s.sum() for s in stats(f1, f2, mix))  # noqa: E731
        grads = map_bytes(f1, f2)
        blocks = -(-n_pix // tile_walk_config(n_pix, max(c1, c2)).block_rows)
        walk_fwd = blocks * map_bytes(f1, f2)
        walk_bwd = sum(-(-c // tile_walk_config(n_pix, c).block_out) for c in (c1, c2)) * blocks * map_bytes(f1, f2)
        walk_bwd += grads
    holder = {}
    fwd = count_traffic(lambda: holder.setdefault("out", run()))
    bwd = count_traffic(lambda: holder["out"].sum().backward())
    minimum_fwd = map_bytes(f1, f2)
    minimum_bwd = map_bytes(f1, f2) + grads
    if path == "triton":
        walk_fwd, walk_bwd = minimum_fwd, minimum_bwd
    return {
        "path": path, "c1": c1, "c2": c2, "n_pix": n_pix, "dtype": str(dtype).removeprefix("torch."),
        "forward": fwd, "backward": bwd, "minimum_forward": minimum_fwd, "minimum_backward": minimum_bwd,
        "dram_multiple": (fwd.dram_bytes + bwd.dram_bytes) / (minimum_fwd + minimum_bwd),
        "issued_multiple": (fwd.issued_bytes + bwd.issued_bytes) / (minimum_fwd + minimum_bwd),
        "dram_multiple_forward": fwd.dram_bytes / minimum_fwd,
        "dram_multiple_backward": bwd.dram_bytes / minimum_bwd,
        "walk_minimum_forward": walk_fwd, "walk_minimum_backward": walk_bwd,
        "walk_multiple": (fwd.issued_bytes + bwd.issued_bytes) / (walk_fwd + walk_bwd),
    }


def fitted_traffic(path: str, c1: int, c2: int, sides=(32, 48), n_pix: int = 65_536, **kwargs) -> dict:
    """DRAM multiples at `n_pix` pixels per image from counts at two sizes, each phase's bytes fitted as
    a + b·N: C×C partial sums and per-launch vectors are a fixed cost per image, which weighs as much as
    the maps at N = 1,024 and C = 256 but not at a production N (65,536 at 1024² patches)."""
    small, big = (path_traffic(path, c1, c2, side=s, **kwargs) for s in sides)
    na, nb = small["n_pix"], big["n_pix"]
    out = {"path": small["path"], "c1": c1, "c2": c2, "n_pix": n_pix, "dtype": small["dtype"], "fitted": sides}
    total, total_min = 0.0, 0.0
    for phase in ("forward", "backward"):
        ya, yb = small[phase].dram_bytes, big[phase].dram_bytes
        at = ya + (yb - ya) / (nb - na) * (n_pix - na)
        minimum = small[f"minimum_{phase}"] * n_pix / na
        out[f"dram_multiple_{phase}"] = at / minimum
        total, total_min = total + at, total_min + minimum
    out["dram_multiple"] = total / total_min
    return out


def format_table(results: list[dict]) -> str:
    lines = ["| path | C₁/C₂ | N | dtype | fwd DRAM ×min | bwd DRAM ×min | fwd+bwd DRAM ×min | fwd+bwd issued ×min "
             "| issued ×walk min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = f"{r['n_pix']:,}" + (f" (fit of {'²,'.join(map(str, r['fitted']))}²)" if "fitted" in r else "")
        issued = f"{r['issued_multiple']:.2f}" if "issued_multiple" in r else "-"
        walk = f"{r['walk_multiple']:.2f}" if r.get("path") != "triton" and "walk_multiple" in r else "-"
        lines.append(f"| {r['path']} | {r['c1']}/{r['c2']} | {n} | {r['dtype']} | "
                     f"{r['dram_multiple_forward']:.2f} | {r['dram_multiple_backward']:.2f} | "
                     f"{r['dram_multiple']:.2f} | {issued} | {walk} |")
    return "\n".join(lines)


def format_kernels(result: dict) -> str:
    lines = [f"{result['path']} C={result['c1']}/{result['c2']} N={result['n_pix']}: bytes per kernel "
             "(issued / DRAM model), as multiples of one pass over both maps"]
    unit = result["minimum_forward"]
    for phase in ("forward", "backward"):
        for kernel, (issued, dram) in result[phase].by_kernel().items():
            lines.append(f"  {phase:8s} {kernel:32s} {issued / unit:7.2f} {dram / unit:7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(Exception):
        torch.set_num_threads(1)
    results = [path_traffic("triton", c1, c2) for c1, c2 in ((24, 24), (256, 256), (256, 24))]
    fitted = [fitted_traffic("triton", c1, c2) for c1, c2 in ((24, 24), (256, 256), (256, 24))]
    walks = [path_traffic("tiled", c, c, side=16) for c in (24, 256)]
    walks += [path_traffic("pixel_relation", 256, 24, side=16)]
    print(format_table(results + fitted + walks))
    for r in results + walks:
        print(format_kernels(r))
