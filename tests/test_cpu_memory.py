"""cocofast/cpu_memory.py: large CPU tensors come from reused memory, and what is computed does not change.

Each case runs in its own interpreter: the setting is process-wide, and the control (the system default)
needs a process that never made it."""
import json
import subprocess
import sys
import textwrap

import pytest

from cocofast.cpu_memory import glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="keep_freed_memory acts on glibc's malloc only")

FAULTS = textwrap.dedent("""
    import json, resource, sys, torch
    from cocofast.cpu_memory import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    def churn(n):  # 64 MB tensors, each freed before the next: above any mmap threshold
        for _ in range(n):
            torch.empty(16 << 20).fill_(1.0)
    # Warm up first: torch asks for 64-byte aligned blocks, and until the heap holds a free block with room
    # for that alignment's slack (a few allocations in), one is carved afresh from the top.
    churn(12)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn(8)
    print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")

TRAIN = textwrap.dedent("""
    import hashlib, json, sys, torch
    from cocofast.cpu_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 2, 3, padding=1))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(4, 3, 256, 256), torch.randint(0, 2, (4, 256, 256))
    for _ in range(3):  # 32 MB activations: mmapped blocks under the system default, heap blocks when kept
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()
    print(json.dumps({"digest": digest}))
""")


def run(script: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_instead_of_mapped_afresh():
    kept, system = run(FAULTS, "keep"), run(FAULTS, "system")
    assert kept["kept"] is True
    # 8 fresh 64 MB blocks touched in full are 8 x 16,384 faults of 4 KB pages; reused, next to none.
    assert system["faults"] > 50_000, system
    assert kept["faults"] < 2_000, kept


def test_training_is_bit_identical_either_way():
    assert run(TRAIN, "keep") == run(TRAIN, "system")


def test_a_second_call_is_a_no_op_that_still_reports_the_setting():
    out = subprocess.run([sys.executable, "-c", "from cocofast.cpu_memory import keep_freed_memory as k; "
                          "print(k(), k())"], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "True"]
