"""Test-wide set-up: Triton's CPU interpreter when no GPU is present, and deterministic hypothesis runs."""
import os

import torch

if not torch.cuda.is_available():
    # Must happen before any cocofast kernel module is imported: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("cocofast", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("cocofast")
