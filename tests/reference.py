"""An independent float64 reference for CMSS and the cross-layer correlation (CoCo DistillNet §III-B), in numpy, built from sums of squares."""
import numpy as np
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows(f: np.ndarray, channel_mix: bool = True, eps: float = 1e-6) -> np.ndarray:
    """(C, H, W) -> Â (N, C) in float64."""
    f = np.asarray(f, dtype=np.float64)
    c = f.shape[0]
    g = f.reshape(c, -1).T
    if channel_mix:
        a = g.max(axis=0)
        w = np.exp(a - a.max())
        g = g * (w / w.sum())
    norm = np.sqrt((g * g).sum(axis=1))
    return g / np.maximum(norm, eps)[:, None]


def stats(f1: np.ndarray, f2: np.ndarray, channel_mix: bool = True):
    """Per image (k, p, q, d): ⟨M₁,M₂⟩, ‖M₁‖², ‖M₂‖², ‖M₁−M₂‖², from the explicit N×N matrices."""
    out = []
    for a, b in zip(f1, f2):
        m1 = rows(a, channel_mix) @ rows(a, channel_mix).T
        m2 = rows(b, channel_mix) @ rows(b, channel_mix).T
        out.append(((m1 * m2).sum(), (m1 * m1).sum(), (m2 * m2).sum(), ((m1 - m2) ** 2).sum()))
    return np.array(out)


def phi(f1, f2):
    k, p, q, _ = stats(f1, f2).T
    den = np.sqrt(p * q)
    return np.where(den > 0, k / np.where(den > 0, den, 1), 0.0)


def distance(ft, fs, channel_mix=True):
    n = ft.shape[2] * ft.shape[3]
    return float(stats(ft, fs, channel_mix)[:, 3].mean() / (n * n))


def features(seed, batch, channels, h, w, dtype, relu=False, scale=1.0):
    """Reproducible test maps (B, C, H, W) on the test device: drawn in fp64, then cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) * scale
    if relu:
        x = x.clamp_min(0)
    return x.to(dtype).to(DEVICE)


# --- helpers the loss tests share ----------------------------------------------------------------------
def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def close(actual: torch.Tensor, expected: float, rtol: float = 1e-4, atol: float = 1e-7) -> None:
    """A loss value: an fp32 scalar within tolerance of its float64 reference."""
    assert actual.dtype == torch.float32 and actual.dim() == 0
    np.testing.assert_allclose(actual.item(), expected, rtol=rtol, atol=atol)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
