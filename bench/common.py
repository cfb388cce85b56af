"""What every bench result records beside its numbers: the machine, the versions and the commit."""
from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path


def environment() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"machine": f"{platform.node()} {platform.machine()}", "device": device, "torch": torch.__version__,
            "triton": triton.__version__, "commit": commit}


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
