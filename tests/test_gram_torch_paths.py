"""The CPU gram path's own branches against the float64 N×N path: dead pixels (ρ clamped at eps), one map's
gradient only, channel max taken for several images at once and one at a time, the span maxima that find the
max-pool's argmax (ragged tails, N below one span), and the huge-page gradient buffer."""
import pytest
import torch

import cocofast
import cocofast.ops.similarity.gram_torch as gt
from reference import features


def float64_grads(f1, f2, weights, need=(True, True)):
    x1, x2 = (f.detach().double().requires_grad_(n) for f, n in zip((f1, f2), need))
    phi = cocofast.cross_layer_correlation(x1, x2, backend="naive")
    wanted = [x for x in (x1, x2) if x.requires_grad]
    return phi, torch.autograd.grad((phi * weights.double()).sum(), wanted)


def gram_grads(f1, f2, weights, need=(True, True)):
    x1, x2 = (f.detach().clone().requires_grad_(n) for f, n in zip((f1, f2), need))
    phi = cocofast.cross_layer_correlation(x1, x2, backend="gram")
    wanted = [x for x in (x1, x2) if x.requires_grad]
    return phi, torch.autograd.grad((phi * weights).sum(), wanted)


def assert_matches_float64(f1, f2, need=(True, True), tol=1e-4):
    weights = torch.linspace(0.5, 1.5, f1.shape[0])
    phi, grads = gram_grads(f1, f2, weights, need)
    phi64, want = float64_grads(f1, f2, weights, need)
    assert torch.allclose(phi.double(), phi64, rtol=1e-5, atol=1e-7)
    assert len(grads) == len(want) == sum(need)
    for g, w in zip(grads, want):
        assert ((g.double() - w).norm() / w.norm()).item() < tol


def test_dead_and_nearly_dead_pixels():
    """Pixels whose weighted norm is at or below eps: zero columns (a ReLU's dead pixels), and columns scaled
    to 0.8 eps, whose norm is clamped, so their radial part must be masked rather than removed."""
    f1 = features(0, 2, 24, 9, 13, torch.float32, relu=True)
    f2 = features(1, 2, 40, 13, 9, torch.float32)
    f1[0, :, 2, :] = 0.0
    f1[1, :, :, 4] *= 1e-3
    w = torch.softmax(f1.amax(dim=(2, 3)), 1)[:, :, None, None]
    rho1 = torch.linalg.vector_norm(f1 * w, dim=1, keepdim=True)
    f1[1, :, :, 4] *= (0.8e-6 / rho1[1, :, :, 4])
    rho1 = torch.linalg.vector_norm(f1 * w, dim=1)
    assert (rho1 == 0).any() and ((rho1 > 0.7e-6) & (rho1 <= 1e-6)).sum() == 9
    assert_matches_float64(f1, f2)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_one_map_needs_its_gradient(need):
    """A detached teacher map: only the other map's rows of E are computed."""
    f1 = features(2, 3, 24, 11, 10, torch.float32, relu=True)
    f2 = features(3, 3, 16, 10, 11, torch.float32)
    assert_matches_float64(f1, f2, need)


@pytest.mark.parametrize("group_bytes", [1, 2 * 48 * 110 * 4])
def test_channel_max_for_one_image_or_a_ragged_group_at_a_time(monkeypatch, group_bytes):
    """The forward takes the channel max for as many images as fit _GROUP_BYTES: one (1 byte) or two of
    three, so the last group is short; many pixel blocks too."""
    monkeypatch.setattr(gt, "_BLOCK_BYTES", 1)  # 1,024-pixel blocks: N = 2,440 has 3, the last ragged
    f1 = features(4, 3, 24, 40, 61, torch.float32, relu=True)
    f2 = features(5, 3, 24, 61, 40, torch.float32)
    assert_matches_float64(f1, f2)


@pytest.mark.parametrize("one_gram_channels", [0, 1000])
def test_gram_as_one_product_or_three_blocks(monkeypatch, one_gram_channels):
    monkeypatch.setattr(gt, "_ONE_GRAM_CHANNELS", one_gram_channels)
    f1 = features(8, 2, 40, 9, 11, torch.float32, relu=True)
    f2 = features(9, 2, 24, 11, 9, torch.float32)
    assert_matches_float64(f1, f2)


def test_unmixed_rows_match_float64():
    f1 = features(6, 2, 8, 7, 9, torch.float32)
    f2 = features(7, 2, 12, 9, 7, torch.float32)
    d = cocofast.similarity_distance(f1, f2, channel_mix=False, backend="gram")
    d64 = cocofast.similarity_distance(f1.double(), f2.double(), channel_mix=False, backend="naive")
    assert abs(d.item() - d64.item()) <= 1e-5 * d64.item()


@pytest.mark.parametrize("n", [5, 64, 64 * 3 + 17])
def test_span_maxima_and_batched_max_positions(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 4, 1, n, generator=g)
    x[0, 1] = 0.0                        # a dead channel: every pixel ties
    x[1, 2, 0, [0, n - 1]] = 9.0         # a tie across spans (and the ragged tail)
    amax, spans = gt.span_maxima(x)
    flat = x.reshape(2, 4, n)
    assert torch.equal(amax, flat.amax(dim=2))
    assert spans.shape == (2, 4, n // gt.SPAN)
    if n >= gt.SPAN:
        assert torch.equal(spans, flat[:, :, : n // gt.SPAN * gt.SPAN].reshape(2, 4, -1, gt.SPAN).amax(dim=3))
    img, chan, pix = gt.max_positions(flat, amax, spans)
    got = torch.stack([img, chan, pix], 1)
    want = (flat == amax[:, :, None]).nonzero()
    order = torch.argsort((got[:, 0] * 4 + got[:, 1]) * n + got[:, 2])
    assert torch.equal(got[order], want)
