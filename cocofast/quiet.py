"""Holding back what native code prints: the ONNX exporter's and ONNX Runtime's tools write to the process's
file descriptors directly, past sys.stdout, so redirecting Python's streams does not catch it."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def native_output_captured():
    """Process-level stdout and stderr (file descriptors 1 and 2) go to a scratch file for the block, which is
    then dropped: for libraries that print pages of diagnostics (the ONNX exporter's C++ side prints a whole
    Torch IR graph, some 1,400 lines for FANet, before raising) whose error the caller reports itself."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as scratch:
        try:
            os.dup2(scratch.fileno(), 1)
            os.dup2(scratch.fileno(), 2)
            yield
        finally:
            libc.fflush(None)  # C stdio buffers, where C++'s std::cout goes, before the descriptors come back
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
