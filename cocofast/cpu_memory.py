"""Large CPU tensors from reused memory instead of fresh pages from the kernel.

glibc's malloc hands every block above its mmap threshold (at most 32 MB, whatever mallopt is told) to the
kernel as a fresh mapping and unmaps it on free. A CPU training step at 512x512 allocates and frees gigabytes
of activations and gradients this way, and the kernel zero-fills every 4 KB page of each on first touch.
On the development VM (1 thread, idle), with the setting below:
- a Mobile U-Net x0.5 training step at 512x512, batch 4, over 30 steps: 2.65 s and 460,000-650,000 page
  faults a step with the system default, 1.85 s and 0 faults with it; peak resident memory 2.67 -> 3.25 GB,
  reached by step 15 and flat after it;
- bench/bench_train.py --size 512 (batch 8, one process each way): student alone 5.11 -> 3.78 s, the cached
  CoCo + AdvD step 54.9 -> 40.2 s, with the teacher's forward 75.6 -> 47.7 s. At 128x128 no block passes the
  threshold and the steps time the same.
`keep_freed_memory()` tells malloc to serve every block from its heap (M_MMAP_MAX = 0) and never to give
the heap's top back (M_TRIM_THRESHOLD), so a step's buffers are the previous step's, already mapped.

The memory cost: freed blocks stay with the process, and since torch asks for 64-byte aligned blocks, a
freed block of exactly the next request's size lacks the alignment slack, so the first few rounds of a
repeating pattern carve new blocks before the heap holds ones that fit (tests/test_cpu_memory.py warms up
for it). Inference fragments more: a Mobile U-Net forward at 1024x1024, batch 4, held 3.05 GB -> 5.3 GB and
began faulting again by its third call, so segment and predict leave malloc as it is. It changes how memory
is obtained, not what is computed (the test trains a small network both ways and compares the weights'
bytes). It is process-wide, so the library never calls it on import: the training program does (config
key `keep_freed_memory`), as do the benches that time what training runs. Off glibc (macOS, musl, Windows)
it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold, 2 GiB - 1, is above what a step frees at the heap's top
KEEP_BYTES = 2**31 - 1

_state = {"kept": False}


def glibc():
    """The C library as a ctypes handle when it is glibc (the one whose mallopt takes these numbers), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve large allocations from malloc's heap and keep what is freed, for the rest of this process.
    Returns True once it is in effect (also on later calls), False where the C library is not glibc or
    refused a setting. Call it before the large allocations start: blocks already mapped stay as they are."""
    if _state["kept"]:
        return True
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    ok = ok and libc.mallopt(M_MMAP_MAX, 0) == 1
    _state["kept"] = ok
    return ok
