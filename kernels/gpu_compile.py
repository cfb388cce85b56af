"""Compile cocofast's kernels for real GPUs on a machine without one, and read their resource usage.

The Triton interpreter accepts code that a GPU rejects (dots smaller than 16, unmasked out-of-bounds loads),
so this is the guard: every launch spec recorded by `_launch.launch` is compiled for sm_80 and sm_90 with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, and the cubin is read with the wheel's
own cuobjdump (registers, spills, shared memory) and nvdisasm (tensor-core instructions).

    python -m cocofast.kernels.gpu_compile            # record the standard launches, compile, print a table

Recording runs in the interpreter with COCOFAST_GPU_CONFIG=1 (GPU tile sizes); compiling must run without
TRITON_INTERPRET, so each step is its own process.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)


def record_standard_launches(dtypes=("float32", "bfloat16")) -> list:
    """Run every kernel path on tiny inputs (mixed and plain channels) and return the launch specs."""
    import torch

    import cocofast
    from cocofast.kernels import _launch

    torch.manual_seed(0)
    for dtype in (getattr(torch, d) for d in dtypes):
        for backend in ("triton", "tiled"):
            a = torch.randn(2, 24, 5, 7, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 96, 7, 5, dtype=dtype, requires_grad=True)
            phi = cocofast.cross_layer_correlation(a, b, backend=backend)
            d = cocofast.similarity_distance(a, b, channel_mix=False, backend=backend)
            (phi.sum() + d).backward()
    return list(_launch.LAUNCHED.values())


def _resolve_constexpr(value):
    import triton.language as tl

    if isinstance(value, str) and value.startswith("tl."):
        return tl.dtype(value[3:])
    return value


def compile_specs(specs: list, archs=ARCHS) -> list[dict]:
    """Compile each (module, kernel, signature, constexprs) for each arch; returns one row per pair."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    rows = []
    for module, name, signature, constexprs in specs:
        fn = getattr(importlib.import_module(module), name)
        consts = {k: _resolve_constexpr(v) for k, v in constexprs.items()}
        sig = dict(signature)
        sig.update({k: "constexpr" for k in consts})
        for arch in archs:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            row = {"kernel": name, "arch": f"sm_{arch}", "constexprs": constexprs,
                   "signature": ",".join(signature.values())}
            row.update(_resource_usage(compiled.asm["cubin"], bin_dir))
            row["shared_bytes"] = compiled.metadata.shared  # dynamic shared memory: cuobjdump can't see it
            rows.append(row)
    return rows


def _resource_usage(cubin: bytes, bin_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(bin_dir / "nvdisasm"), str(path)], capture_output=True, text=True,
                              check=True).stdout
    grab = lambda key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", usage)) else 0  # noqa: E731
    return {
        "registers": grab("REG"),
        "stack": grab("STACK"),
        "spill_bytes": grab("LOCAL"),
        "tensor_core": bool(re.search(r"\b(HMMA|HGMMA|DMMA)\b", sass)),
    }


def _python(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{out.stderr[-4000:]}")
    return out.stdout


def check_all(archs=ARCHS, dtypes=("float32", "bfloat16")) -> list[dict]:
    """Record (interpreter, GPU tiles) then compile (no interpreter), each in a fresh process."""
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COCOFAST_GPU_CONFIG")}
    specs = _python("import json; from cocofast.kernels.gpu_compile import record_standard_launches as r; "
                    f"print(json.dumps(r({tuple(dtypes)!r})))",
                    {**base, "TRITON_INTERPRET": "1", "COCOFAST_GPU_CONFIG": "1"})
    code = (f"import json, sys; from cocofast.kernels.gpu_compile import compile_specs; "
            f"print(json.dumps(compile_specs(json.loads(sys.stdin.read()), {tuple(archs)!r})))")
    out = subprocess.run([sys.executable, "-c", code], input=specs.strip().splitlines()[-1], capture_output=True,
                         text=True, env=base)
    if out.returncode != 0:
        raise RuntimeError(f"GPU compile failed:\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = ["| kernel | arch | registers | spill bytes | shared bytes | tensor cores | tiles |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tiles = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k == "ACC")
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes']} | {'yes' if r['tensor_core'] else 'no'} | {tiles} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(check_all(dtypes=("float32", "bfloat16", "float64"))))
