"""CPU `gram` path against its floor and against a user's own 10-line Gram CKA, forward + backward.

The floor is the 7 matrix products of the identity ⟨ÂÂᵀ, Â'Â'ᵀ⟩ = ‖ÂᵀÂ'‖² per image, on ready-made operands:
3 in the forward (Â₁ᵀÂ₁, Â₂ᵀÂ₂, Â₁ᵀÂ₂) and 4 in the backward (C×C by C×N, two into each gradient), i.e.
2·B·N·(C₁² + C₂² + C₁C₂ + (C₁ + C₂)²) FLOPs. It is timed three ways, image by image channel-major (the maps'
own layout), batched (torch.bmm over B) and pixel-major (N×C operands), and the ratio is taken against the
fastest, so a layout trick inside `gram` cannot flatter it. The floor writes into gradient-shaped buffers it
allocated once: earlier versions let each product allocate its C×N result, and whether glibc served those
6 MB blocks from reused heap or from fresh pages (about 1,500 page faults each, ~1.6 µs apiece on this VM)
depended on the process's allocation history, so the same 7 GEMMs timed 70-78 ms in one process and
141-148 ms in another, and C = 24 read 1.5× or 2.9×. The cost `gram` pays for its fresh gradients (it must
return new tensors) is shown beside it: `fresh_gradients_ms` allocates and fills two such buffers.
The bench keeps freed memory for reuse as the training program does (cocofast/cpu_memory.py; the `malloc`
column, `--system_malloc` to leave glibc's default): otherwise every 50 MB gradient is a fresh mapping whose
12,800 pages the kernel zero-fills on first touch (`fresh_gradients_ms` 36 ms against 12 ms kept, at C = 24,
N = 65,536, one run each way).

The user's version (`user_gram_cka`: w = softmax(amax), rows normalised, Gram CKA via ‖AᵀB‖²) runs eager and
under torch.compile, in a second rotation with `gram` (`gram_beside_user_ms`); `*_over_gram` > 1 means
cocofast is faster.

Everything is timed side by side in one process, one thread, as the median of interleaved repetitions of
thread CPU time (time spent descheduled on a busy machine would land on whichever call was running), and
before every timed call the last-level cache is flushed by reading a buffer twice its size, so no call
finds its operands left in cache by the one before (the floor reuses its tensors, `gram` re-reads its
inputs). On this 2-core VM shared with other jobs the memory-bound parts of `gram` swing most with the load
(233-629 ms at C = 24, N = 65,536 within minutes, the floor 88-117 ms): compare rows of one run, and read
`load_1min`. The `gram` step is the public call, input checks included.

    python bench/bench_gram_cpu.py [--repeats 7] [--quick] [--sizes 4096,65536] [--channels 24,64,256,256/24]
                                   [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, write_csv

from cocofast.cpu_memory import keep_freed_memory

SIZES, BATCH = (4096, 65_536), 8
CHANNELS = "24,64,256,256/24"


def channel_pairs(spec: str) -> list[tuple[int, int]]:
    """'24,256/24' -> [(24, 24), (256, 24)]."""
    pairs = []
    for item in spec.split(","):
        c1, _, c2 = item.partition("/")
        pairs.append((int(c1), int(c2 or c1)))
    return pairs


def floor_flops(batch: int, n_pix: int, c1: int, c2: int) -> float:
    return 2.0 * batch * n_pix * (c1 * c1 + c2 * c2 + c1 * c2 + (c1 + c2) ** 2)


def floor_calls(batch: int, n_pix: int, c1: int, c2: int):
    """{layout: zero-argument callable running the 7 bare GEMMs of one forward + backward}, each writing its
    backward products into gradient-shaped buffers allocated here, once."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a1, a2 = torch.randn(batch, c1, n_pix, generator=gen), torch.randn(batch, c2, n_pix, generator=gen)
    m = torch.randn(batch, c1 + c2, c1 + c2, generator=gen)
    m11, m12, m21, m22 = m[:, :c1, :c1], m[:, :c1, c1:], m[:, c1:, :c1], m[:, c1:, c1:]
    d1, d2 = torch.empty_like(a1), torch.empty_like(a2)
    p1, p2 = a1.transpose(1, 2).contiguous(), a2.transpose(1, 2).contiguous()
    q1, q2 = torch.empty_like(p1), torch.empty_like(p2)
    mt11, mt12, mt21, mt22 = (x.transpose(1, 2).contiguous() for x in (m11, m12, m21, m22))

    def per_image():
        for b in range(batch):
            x1, x2 = a1[b], a2[b]
            x1 @ x1.t(), x2 @ x2.t(), x1 @ x2.t()
            torch.mm(m11[b], x1, out=d1[b]).addmm_(m12[b], x2)
            torch.mm(m21[b], x1, out=d2[b]).addmm_(m22[b], x2)

    def batched():
        t1, t2 = a1.transpose(1, 2), a2.transpose(1, 2)
        torch.bmm(a1, t1), torch.bmm(a2, t2), torch.bmm(a1, t2)
        torch.bmm(m11, a1, out=d1).baddbmm_(m12, a2)
        torch.bmm(m21, a1, out=d2).baddbmm_(m22, a2)

    def pixel_major():
        for b in range(batch):
            x1, x2 = p1[b], p2[b]
            x1.t() @ x1, x2.t() @ x2, x1.t() @ x2
            torch.mm(x1, mt11[b], out=q1[b]).addmm_(x2, mt12[b])
            torch.mm(x1, mt21[b], out=q2[b]).addmm_(x2, mt22[b])

    return {"channel-major per image": per_image, "channel-major bmm": batched, "pixel-major per image": pixel_major}


def maps(batch: int, n_pix: int, c1: int, c2: int, seed: int = 1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    side = int(n_pix ** 0.5)
    f1 = torch.randn(batch, c1, side, n_pix // side, generator=gen).relu_().requires_grad_(True)
    f2 = torch.randn(batch, c2, side, n_pix // side, generator=gen).relu_().requires_grad_(True)
    return f1, f2


def gram_call(f1, f2):
    import cocofast

    def step():
        f1.grad = f2.grad = None
        cocofast.cross_layer_correlation(f1, f2, backend="gram").sum().backward()

    return step


def user_gram_cka(f1, f2, eps: float = 1e-6):
    """What a user would write: CoCo's φ as an uncentred Gram CKA on the channel-mixed, normalised rows."""
    import torch

    def rows(f):
        w = torch.softmax(f.amax(dim=(2, 3)), dim=1)
        a = (f * w[:, :, None, None]).flatten(2).transpose(1, 2)  # (B, N, C)
        return a / torch.linalg.vector_norm(a, dim=2, keepdim=True).clamp_min(eps)

    a1, a2 = rows(f1), rows(f2)
    sq = lambda x, y: (x.transpose(1, 2) @ y).square().sum(dim=(1, 2))  # noqa: E731
    return sq(a1, a2) / torch.sqrt(sq(a1, a1) * sq(a2, a2))


def user_calls(f1, f2, compiled: bool):
    import torch

    out = {}
    for name, fn in [("user eager", user_gram_cka)] + ([("user compiled", torch.compile(user_gram_cka, dynamic=False))]
                                                         if compiled else []):
        def step(fn=fn):
            f1.grad = f2.grad = None
            fn(f1, f2).sum().backward()

        out[name] = step
    return out


def fresh_gradients_call(batch: int, n_pix: int, c1: int, c2: int):
    """Allocating and writing two gradient-sized fp32 buffers, as any backward that returns new tensors must."""
    import torch

    def step():
        for c in (c1, c2):
            torch.empty(batch, c, n_pix).fill_(1.0)

    return step


def cache_flush():
    """A callable that evicts the last-level cache by reading a buffer twice its size. Reading, not writing:
    a written buffer leaves the cache full of dirty lines whose write-back lands on the next timed call, and
    most on the call that moves the most memory."""
    import torch

    llc = 64 << 20  # where the size cannot be read
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()  # e.g. "266240K"
        llc = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
    except (OSError, ValueError):
        pass
    buf = torch.zeros(min(2 * llc, 1 << 30) // 4)
    return lambda: buf.sum()


def interleaved_medians(calls: dict, repeats: int, flush=lambda: None, clock=time.thread_time) -> dict:
    """Median seconds per call. The default clock is this thread's CPU time: on a shared machine, time spent
    descheduled would otherwise land on whichever call was running."""
    for fn in calls.values():
        fn()  # warm-up: allocator, MKL state, torch.compile's compilation
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            flush()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> list[dict]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="N = 4,096 only (a smoke run)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated N (square numbers)")
    ap.add_argument("--channels", default=os.environ.get("COCOFAST_BENCH_CHANNELS", CHANNELS),
                    help="comma-separated C or C1/C2")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd user version")
    ap.add_argument("--system_malloc", action="store_true",
                    help="leave malloc as the system sets it (training keeps freed memory by default)")
    args, _ = ap.parse_known_args(argv)  # bench/run.py hands every bench the same options
    torch.set_num_threads(1)
    # As the training program does (config key keep_freed_memory): gram's fresh gradients then reuse pages.
    malloc = "system" if args.system_malloc or not keep_freed_memory() else "kept"
    torch._dynamo.config.cache_size_limit = 64  # one static compilation per shape
    env = environment()  # the commit and load as the measurement starts (others may commit meanwhile)
    sizes = [4096] if args.quick else [int(n) for n in args.sizes.split(",")]
    flush = cache_flush()
    rows = []
    for n_pix in sizes:
        for c1, c2 in channel_pairs(args.channels):
            floors = floor_calls(BATCH, n_pix, c1, c2)
            f1, f2 = maps(BATCH, n_pix, c1, c2)  # one pair of maps for gram and the user's version
            gram = gram_call(f1, f2)
            calls = {"gram": gram, **floors, "fresh gradients": fresh_gradients_call(BATCH, n_pix, c1, c2)}
            med = interleaved_medians(calls, args.repeats, flush)
            # The user's versions in a rotation of their own, against gram again: the compiled call frees
            # GB-sized buffers, and on this VM the page faults of whatever runs next then cost 5-15x the
            # system time, which put gram at 473-675 ms instead of 254-276 ms beside the floor alone.
            users = user_calls(f1, f2, compiled=not args.no_compile)
            med_user = interleaved_medians({"gram": gram, **users}, args.repeats, flush)
            floor_name = min(floors, key=med.get)
            row = {"N": n_pix, "batch": BATCH, "channels": f"{c1}/{c2}" if c1 != c2 else c1,
                   "repeats": args.repeats, "malloc": malloc, "gram_ms": round(med["gram"] * 1e3, 1)}
            row.update({f"floor_{k.replace(' ', '_').replace('-', '_')}_ms": round(med[k] * 1e3, 1) for k in floors})
            row["fastest_floor"] = floor_name
            row["gram_over_floor"] = round(med["gram"] / med[floor_name], 2)
            row["gram_over_channel_major_mm"] = round(med["gram"] / med["channel-major per image"], 2)
            row["fresh_gradients_ms"] = round(med["fresh gradients"] * 1e3, 1)
            for name in ("user eager", "user compiled"):
                if name in med_user:
                    row[f"{name.replace(' ', '_')}_ms"] = round(med_user[name] * 1e3, 1)
                    row[f"{name.replace(' ', '_')}_over_gram"] = round(med_user[name] / med_user["gram"], 2)
            row["gram_beside_user_ms"] = round(med_user["gram"] * 1e3, 1)
            row["floor_GFLOP"] = round(floor_flops(BATCH, n_pix, c1, c2) / 1e9, 2)
            rows.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            del calls, floors, users, gram, f1, f2
            torch._dynamo.reset()
    write_csv(HERE / "results" / "gram_cpu_floor.csv", rows, env)
    return rows


if __name__ == "__main__":
    main()
