"""The fused Gram kernels' self-check: the first launch of each kernel class is compared with the float64
`gram` path on that very batch, so a kernel a GPU compiled wrong is caught before it trains anything.

A class is everything that selects a different compiled kernel: device, dtypes, channel mixing and the
launch constexprs (tiles, row splits, the two-pass backward; cocofast.kernels.gram.launch_class). Its first
call runs both paths forward and backward on detached copies of the batch and compares φ per image and
the gradients of Σ_b w_b φ_b with the documented contract (values 1e-5 and gradients 1e-4 norm-wise for
fp32 maps, 1e-2 for fp16 / bf16). On a disagreement:

- backend='auto': warn once, with the figures, and run `gram` for that class from then on;
- backend='triton': raise KernelSelfCheckError (the user asked for the kernels by name).

Cost: one extra forward + backward of the kernels and of the float64 `gram` path per class and process
(`cost_seconds()` sums it). On by default where it matters, CUDA devices; `configure(True)` turns it on
everywhere (the interpreter tests), `configure(False)` off (the `kernel_self_check` config key).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

# fp32 maps: φ 1e-5 relative, gradients 1e-4 norm-wise; half-precision maps: 1e-2 (the backends' contract).
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2),
             torch.float64: (1e-9, 1e-8)}


class KernelSelfCheckError(RuntimeError):
    """backend='triton' disagreed with the float64 gram path beyond the contract on a batch."""


class _State:
    enabled: bool | None = None            # None: CUDA only
    verdicts: dict[tuple, str] = {}        # class -> "triton" or "gram"
    seconds: float = 0.0


def configure(enabled: bool | None) -> None:
    """True: check on every device (the interpreter too); False: never; None: on CUDA devices (default)."""
    _State.enabled = enabled


def reset() -> None:
    """Forget every verdict and the cost (a test starts from a process that has checked nothing)."""
    _State.verdicts.clear()
    _State.seconds = 0.0


def cost_seconds() -> float:
    """Wall time spent in self-checks in this process."""
    return _State.seconds


def verdicts() -> dict[tuple, str]:
    return dict(_State.verdicts)


def active(device: torch.device) -> bool:
    return device.type == "cuda" if _State.enabled is None else _State.enabled


def phi_of(k, p, q) -> torch.Tensor:
    pq = p * q
    ok = pq > 0
    return torch.where(ok, k / torch.sqrt(torch.where(ok, pq, torch.ones_like(pq))), torch.zeros_like(k))


def compare(kernel_stats: Callable, f1: torch.Tensor, f2: torch.Tensor, channel_mix: bool, eps: float):
    """(φ error, gradient errors of map 1 and 2) of `kernel_stats(f1, f2) -> (k, p, q)` against the float64
    gram path on the same maps; errors relative (φ per image, floored at 1e-2; gradients norm-wise)."""
    from cocofast.ops.similarity.gram_torch import TorchGramStats

    # Grad on even under no_grad (the teacher's φ); autocast off, so the reference stays float64 throughout.
    with torch.enable_grad(), torch.autocast(f1.device.type, enabled=False):
        xs = [f.detach().clone().requires_grad_(True) for f in (f1, f2)]
        refs = [f.detach().double().requires_grad_(True) for f in (f1, f2)]
        phi = phi_of(*kernel_stats(*xs))
        ref = phi_of(*TorchGramStats.apply(*refs, channel_mix, eps))
        weights = torch.linspace(0.5, 1.5, f1.shape[0], device=f1.device, dtype=torch.float64)
        grads = torch.autograd.grad((phi.double() * weights).sum(), xs, allow_unused=True)
        ref_grads = torch.autograd.grad((ref * weights).sum(), refs)
    phi_err = ((phi.detach().double() - ref.detach()).abs() / ref.detach().abs().clamp_min(1e-2)).max().item()
    grad_errs = []
    for g, r in zip(grads, ref_grads):
        g = torch.zeros_like(r) if g is None else g.double()
        grad_errs.append(((g - r).norm() / r.norm().clamp_min(1e-30)).item())
    return phi_err, grad_errs


def checked_backend(fn: str, f1: torch.Tensor, f2: torch.Tensor, channel_mix: bool, eps: float, *,
                    explicit: bool, kernel_stats: Callable, key: tuple) -> str:
    """'triton' or 'gram': what to run for this kernel class, checking it on this batch the first time."""
    if not active(f1.device):
        return "triton"
    key = (str(f1.device), str(f1.dtype), str(f2.dtype), bool(channel_mix), key)
    verdict = _State.verdicts.get(key)
    if verdict is not None:
        if verdict == "gram" and explicit:
            raise KernelSelfCheckError(f"{fn}(backend='triton'): the fused kernels failed their self-check for "
                                       f"this class earlier in this process ({_describe(key)}); use backend='gram'")
        return verdict
    start = time.perf_counter()
    try:
        phi_err, grad_errs = compare(kernel_stats, f1, f2, channel_mix, eps)
    finally:
        _State.seconds += time.perf_counter() - start
    val_tol, grad_tol = TOLERANCE[torch.promote_types(f1.dtype, f2.dtype)]
    ok = phi_err <= val_tol and max(grad_errs) <= grad_tol
    if ok:
        _State.verdicts[key] = "triton"
        return "triton"
    figures = (f"φ off by {phi_err:.3g} relative (tolerance {val_tol:g}), gradients by {grad_errs[0]:.3g} and "
               f"{grad_errs[1]:.3g} norm-wise (tolerance {grad_tol:g}) against the float64 gram path, "
               f"maps {tuple(f1.shape)} and {tuple(f2.shape)}; {_describe(key)}")
    _State.verdicts[key] = "gram"
    if explicit:
        raise KernelSelfCheckError(f"{fn}(backend='triton'): the fused kernels disagree on this batch: {figures}. "
                                   "Use backend='gram' (or 'auto', which falls back by itself) and report this "
                                   "GPU and shape")
    warnings.warn(f"{fn}(backend='auto'): the fused Triton kernels failed their self-check ({figures}); running "
                  "backend='gram' for this kernel class from now on", RuntimeWarning, stacklevel=3)
    return "gram"


def _describe(key: tuple) -> str:
    device, d1, d2, mix, launch = key
    return f"device {device}, dtypes {d1}/{d2}, channel_mix={mix}, kernel class {launch}"


__all__ = ["KernelSelfCheckError", "TOLERANCE", "active", "checked_backend", "compare", "configure",
           "cost_seconds", "phi_of", "reset", "verdicts"]
