"""Compile cocofast's kernels for real GPUs on a machine without one, and read what ptxas made of them.

The Triton interpreter accepts code that a GPU rejects (dots smaller than 16, unmasked out-of-bounds loads)
and says nothing about registers, so this is the guard: every launch spec recorded by `launcher.launch` at
the networks' production channel counts is compiled for sm_80 and sm_90 with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, and read three ways:

- `ptxas -v` on the PTX gives registers and spill stores / loads. cuobjdump's LOCAL field stays 0 when ptxas
  spills (spills land in the stack frame), so the stack frame is read as well and any non-zero one fails.
- the TTGIR gives every dot and its layout: a dot that lowered to FMAs keeps a blocked layout instead of
  `#mma` (HMMA) or becoming `ttng.warp_group_dot` (wgmma); nvdisasm's SASS must then show HMMA / HGMMA.
- registers, warps and shared memory give CTAs per SM (occupancy), computed as the CUDA occupancy
  calculator does.

    python -m cocofast.perf.gpu_compile     # record every production launch, compile, print the table

Recording runs in the interpreter with COCOFAST_GPU_CONFIG=1 (GPU tile sizes); compiling must run without
TRITON_INTERPRET, so each step is its own process. ptxas reports are cached by PTX hash next to Triton's
own cache, so a second run only re-reads cubins Triton already has.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)
# (C₁, C₂) pairs the networks hand the kernels (their taps, `cocofast models` lists them): Mobile U-Net 24, ENet and ERFNet 64, the
# FANet teacher 256 (its deepest encoder stage 512), and a teacher-student pair for similarity_distance and
# the CPKD pixel relation (256 with 24). 96 is the channel count the interpreter tests like.
PRODUCTION_PAIRS = ((24, 24), (64, 64), (96, 96), (256, 256), (512, 512), (256, 24))
DTYPES = ("float32", "float16", "bfloat16")
# Per-SM resources the occupancy figure needs (CUDA occupancy calculator, compute capability 8.0 and 9.0).
SM_LIMITS = {
    80: dict(regs=65536, shared=167936, warps=64, ctas=32),
    90: dict(regs=65536, shared=233472, warps=64, ctas=32),
}
SHARED_RESERVED_PER_CTA = 1024  # the driver keeps 1 KiB per CTA on sm_80 and later
MMA = re.compile(r"\b(HMMA|HGMMA|DMMA|IMMA)\b")


# ------------------------------------------------------------------- negative controls for the guard


try:
    import triton
    import triton.language as tl

    @triton.jit
    def spill_probe_kernel(x_ptr, out_ptr, n_iter, BLOCK: tl.constexpr):
        """Deliberately too big for one warp's registers (three live 64×64 fp32 tiles): ptxas must spill."""
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for i in range(n_iter):
            acc = acc * x + i
            acc2 = acc2 + tl.exp(acc * (i + 1))
        tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc + acc2)

    @triton.jit
    def fma_dot_probe_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        """An fp32 dot in "ieee" precision: Triton lowers it to FMAs, never to tensor cores."""
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
        tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(x, x, input_precision="ieee"))
except ImportError:  # pragma: no cover - triton is a dependency
    pass

PROBE_SPECS = [
    (__name__, "spill_probe_kernel", {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_iter": "i32"}, {"BLOCK": 64},
     {"num_warps": 1, "num_stages": 1}),
    (__name__, "fma_dot_probe_kernel", {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 32},
     {"num_warps": 4, "num_stages": 1}),
]


# What the guard records: every pair and dtype at the networks' production launch (B = 8 images of 256²
# maps, the H/4 stage of a 1024² patch: SPLITS = 11 at C = 24) and at a small one (B = 1, 8²: SPLITS = 1,
# where integers equal to 1 such as the batch stride of a single image are specialised differently).
PRODUCTION_SHAPES = ((8, 256), (1, 8))


# The kernel paths record_launches can run: the fused Gram path with and without channel mixing (what
# backend='triton' and 'auto' launch), the tiled N×N walk, and the CPKD pixel relation.
PATHS = ("gram", "gram_plain", "tiled", "pixel_relation")


def record_launches(pairs=PRODUCTION_PAIRS, dtypes=DTYPES, shapes=PRODUCTION_SHAPES, paths=PATHS) -> list:
    """Every kernel path of `paths` forward and backward on (B, C, side, side) maps for each channel pair,
    dtype and (B, side) of `shapes`, recorded without running (launcher.record_only): the specs carry each
    launch's constexprs (tiles, SPLITS, TWO_PASS), options and Triton's argument specialisation. Needs the
    GPU tile configuration (COCOFAST_GPU_CONFIG=1, as check_all sets)."""
    import torch

    from cocofast.kernels import launcher
    from cocofast.kernels.gram import gram_stats
    from cocofast.kernels.pixel_relation import pixel_relation_rows
    from cocofast.kernels.tiled import tiled_stats

    if not launcher.gpu_config():
        raise RuntimeError("record_launches needs the GPU tile configuration: set COCOFAST_GPU_CONFIG=1")
    with launcher.record_only():
        for batch, side in shapes:
            for c1, c2 in pairs:
                for dtype in (getattr(torch, d) for d in dtypes):
                    # No kernel runs, so the maps' values never matter: empty ones cost no memory untouched.
                    a = torch.empty(batch, c1, side, side, dtype=dtype, requires_grad=True)
                    b = torch.empty(batch, c2, side, side, dtype=dtype, requires_grad=True)
                    runs = {"gram": lambda: gram_stats(a, b, True), "gram_plain": lambda: gram_stats(a, b, False),
                            "tiled": lambda: tiled_stats(a, b, True),
                            "pixel_relation": lambda: (pixel_relation_rows(a.detach(), b, 0.5, True),)}
                    for path in paths:
                        sum(s.sum() for s in runs[path]()).backward()
    return list(launcher.LAUNCHED.values())


def _resolve_constexpr(value):
    import triton.language as tl

    if isinstance(value, str) and value.startswith("tl."):
        return tl.dtype(value[3:])
    return value


def _cache_dir() -> Path:
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    path = root / "cocofast-ptxas"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill stores / loads and stack frame from `ptxas -v`: the ptxas and flags Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    key = hashlib.sha256(f"{arch}\n{ptx}".encode()).hexdigest()
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                              str(src), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    report = parse_ptxas_log(out.stderr + out.stdout)
    cached.write_text(json.dumps(report))
    return report


PTXAS_FIELDS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
}


class UnreadableReport(ValueError):
    """A compile report lacked a field the guard reads: a missing figure is an error, never a 0."""


def parse_ptxas_log(log: str) -> dict:
    """The numbers of one kernel's `ptxas -v` report; a field it does not show raises UnreadableReport."""
    out = {}
    for name, pattern in PTXAS_FIELDS.items():
        m = re.search(pattern, log)
        if m is None:
            raise UnreadableReport(f"ptxas -v report has no {name!r} field (pattern {pattern!r}); log:\n{log[-2000:]}")
        out[name] = int(m.group(1))
    return out


def dot_layouts(ttgir: str) -> dict:
    """How many dots the kernel has and how many of them lowered to tensor cores (mma layout or wgmma)."""
    dots = [line for line in ttgir.splitlines() if re.search(r"= (tt\.dot|ttng\.warp_group_dot)\b", line)]
    on_mma = [line for line in dots if "warp_group_dot" in line or re.search(r"->\s*tensor<[^>]*#mma", line)]
    return {"dots": len(dots), "dots_on_mma": len(on_mma)}


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared: int) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them (registers are allocated per warp in units
    of 256, i.e. per-thread counts round up to a multiple of 8)."""
    lim = SM_LIMITS[arch]
    warp_regs = -(-max(registers, 1) * 32 // 256) * 256
    by = {
        "registers": (lim["regs"] // warp_regs) // num_warps,
        "shared": lim["shared"] // (shared + SHARED_RESERVED_PER_CTA),
        "warps": lim["warps"] // num_warps,
        "ctas": lim["ctas"],
    }
    limiter = min(by, key=by.get)
    return by[limiter], limiter


def compile_specs(specs: list, archs=ARCHS) -> list[dict]:
    """Compile each (module, kernel, signature, constexprs, options) for each arch; one row per pair."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    rows = []
    for spec in specs:
        module, name, signature, constexprs, options = spec[:5]
        special = spec[5] if len(spec) > 5 else {}  # launcher.jit_specialisation; none: the generic signature
        fn = getattr(importlib.import_module(module), name)
        consts = {k: _resolve_constexpr(v) for k, v in constexprs.items()}
        consts.update({k: 1 for k, v in special.items() if v == "1"})  # what the JIT makes of an int equal to 1
        sig = dict(signature)
        sig.update({k: "constexpr" for k in consts})
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in special.items() if v == "D"}
        for arch in archs:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            row = {"kernel": name, "arch": f"sm_{arch}", "dtype": next(iter(signature.values())),
                   "constexprs": constexprs, "options": dict(options), "signature": ",".join(signature.values()),
                   "specialisation": dict(special)}
            # The source hash covers the kernel's code and everything it calls, the signature, constants and
            # alignment hints: a cached reading is of exactly this compile.
            cached = _cache_dir() / (hashlib.sha256(f"{triton.__version__}|{src.hash()}|{arch}|"
                                                    f"{sorted(options.items())}".encode()).hexdigest() + ".row.json")
            if cached.exists():
                row.update(json.loads(cached.read_text()))
            else:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
                reading = ptxas_report(compiled.asm["ptx"], arch)
                reading.update(dot_layouts(compiled.asm["ttgir"]))
                reading["mma"] = sorted(set(MMA.findall(_sass(compiled.asm["cubin"], bin_dir))))
                reading["shared_bytes"] = compiled.metadata.shared
                cached.write_text(json.dumps(reading))
                row.update(reading)
            row["ctas_per_sm"], row["limited_by"] = ctas_per_sm(arch, row["registers"], options["num_warps"],
                                                                row["shared_bytes"])
            rows.append(row)
    return rows


def _sass(cubin: bytes, bin_dir: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(bin_dir / "nvdisasm"), str(path)], capture_output=True, text=True,
                              check=True).stdout


def problems(row: dict) -> list[str]:
    """Why a compiled kernel is not GPU-grade: spills, a stack frame, or a dot off the tensor cores."""
    out = []
    if row["spill_stores"] or row["spill_loads"] or row["stack"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads, "
                   f"stack {row['stack']} B")
    if row["dots_on_mma"] < row["dots"] or (row["dots"] and not row["mma"]):
        out.append(f"{row['dots'] - row['dots_on_mma']} of {row['dots']} dots off the tensor cores "
                   f"(SASS MMA: {row['mma'] or 'none'})")
    return out


def run_python(code: str, env: dict, stdin: str | None = None) -> str:
    """Run `code` in a fresh interpreter with `env`; its stdout, or a RuntimeError carrying its stderr."""
    out = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{out.stderr[-6000:]}")
    return out.stdout


def compile_in_subprocess(specs: list, archs=ARCHS) -> list[dict]:
    """compile_specs in a process without TRITON_INTERPRET (the caller's may have it set)."""
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COCOFAST_GPU_CONFIG")}
    code = ("import json, sys; from cocofast.perf.gpu_compile import compile_specs; "
            f"print(json.dumps(compile_specs(json.loads(sys.stdin.read()), {tuple(archs)!r})))")
    return json.loads(run_python(code, base, stdin=json.dumps(specs)).strip().splitlines()[-1])


def check_all(archs=ARCHS, pairs=PRODUCTION_PAIRS, dtypes=DTYPES, shapes=PRODUCTION_SHAPES,
              paths=PATHS) -> list[dict]:
    """Record (interpreter, GPU tiles) then compile (no interpreter), each in a fresh process."""
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COCOFAST_GPU_CONFIG")}
    specs = run_python("import json; from cocofast.perf.gpu_compile import record_launches as r; "
                       f"print(json.dumps(r({tuple(pairs)!r}, {tuple(dtypes)!r}, {tuple(shapes)!r}, "
                       f"{tuple(paths)!r})))",
                       {**base, "TRITON_INTERPRET": "1", "COCOFAST_GPU_CONFIG": "1"})
    return compile_in_subprocess(json.loads(specs.strip().splitlines()[-1]), archs)


def format_table(rows: list[dict]) -> str:
    lines = ["| kernel | arch | dtype | tiles | warps/stages(/maxnreg) | registers | spill st/ld B | stack B | shared B | "
             "CTAs/SM (limit) | dots on MMA | SASS MMA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiles = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r["constexprs"].items()
                         if k.startswith("BLOCK") or k in ("CP1", "CP2", "SPLITS"))
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype'].lstrip('*')} | {tiles} | "
                     f"{r['options']['num_warps']}/{r['options']['num_stages']}"
                     f"{'/' + str(r['options']['maxnreg']) if r['options'].get('maxnreg') else ''} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared_bytes']} | "
                     f"{r['ctas_per_sm']} ({r['limited_by']}) | {r['dots_on_mma']}/{r['dots']} | "
                     f"{','.join(r['mma']) or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cocofast.perf.gpu_compile",
                                 description="Record every production launch of cocofast's kernels, compile it for "
                                             "sm_80 / sm_90 and print registers, spills and MMA use.")
    ap.add_argument("--pairs", default=",".join(f"{a}/{b}" for a, b in PRODUCTION_PAIRS),
                    help="channel pairs C1/C2, comma-separated (default: every production pair)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="map dtypes, comma-separated")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, comma-separated")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"kernel paths, comma-separated, of {', '.join(PATHS)}")
    args = ap.parse_args(argv)
    paths = tuple(args.paths.split(","))
    if not set(paths) <= set(PATHS):
        ap.error(f"--paths must name some of {', '.join(PATHS)}; got {args.paths!r}")
    try:
        pairs = tuple(tuple(int(c) for c in p.split("/")) for p in args.pairs.split(","))
        archs = tuple(int(a) for a in args.archs.split(","))
    except ValueError:
        ap.error(f"--pairs must look like 24/24,256/24 and --archs like 80,90; got {args.pairs!r}, {args.archs!r}")
    table = check_all(archs, pairs, tuple(args.dtypes.split(",")), PRODUCTION_SHAPES, paths)
    print(format_table(table))
    bad = [(r["kernel"], r["arch"], r["dtype"], p) for r in table for p in problems(r)]
    print(f"\n{len(table)} compiles, {len(bad)} problems")
    for b in bad:
        print(" ", *b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
