"""What every bench result records beside its numbers: the machine, the versions and the commit."""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def environment() -> dict:
    import torch
    import triton

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip() or "unknown"
        # Tracked files changed since that commit: the figures are of code no commit holds.
        # bench/results is what the benches write: under `make bench` it is not code the figures depend on.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "cocofast", "kernels",
                                "train", "bench", ":(exclude)bench/results"], capture_output=True, text=True,
                               cwd=here.parent).stdout.strip()
        if dirty and commit != "unknown":
            commit += "+uncommitted"
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    # The 1-minute load average when the figures were written: on a shared machine, how busy it was.
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return {"machine": f"{platform.node()} {platform.machine()}", "device": device, "torch": torch.__version__,
            "triton": triton.__version__, "commit": commit, "load_1min": load}


def write_csv(path: Path, rows: list[dict], env: dict) -> None:
    """Rows with the environment as leading columns, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = list(env)
    for row in rows:
        keys += [k for k in row if k not in keys]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    os.replace(tmp, path)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_bytes() -> int:
    """Free memory on the device the bench runs on (GPU if present, else host MemAvailable)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    from cocofast.ops.checks import available_host_memory

    return available_host_memory()


def run_child(module: str, args: dict, timeout: float, interpret: bool = False) -> dict:
    """`module.run_case(**args)` in a fresh process (clean peak memory); its JSON result, or {"error": ...}."""
    here = str(Path(__file__).resolve().parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); from {module} import run_case; "
            "print(json.dumps(run_case(**json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    try:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                             env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s budget"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:160] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def vm_hwm() -> int:
    """Peak resident memory of this process so far (Linux VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def case_arguments(description: str, interpreter_budget_s: float, out: Path):
    """The options the kernel benches share: time budgets, repeats, which sizes and batches, the CSV."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--budget-s", type=float, default=120.0, help="skip cases estimated above this (per repeat)")
    ap.add_argument("--interpreter-budget-s", type=float, default=interpreter_budget_s,
                    help="budget for the Triton CPU interpreter, which only shows that the kernels run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only N=4,096 (a smoke run)")
    ap.add_argument("--sizes", default="", help="comma-separated N values to run (default: all)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--out", type=Path, default=out)
    return ap
