"""The fused kernels' self-check: a kernel class whose first batch disagrees with the float64 gram path
makes `auto` warn once and fall back to `gram`, and makes an explicit `triton` raise. The check is on for
every device here (configure(True)); by default it runs on CUDA only."""
import warnings

import pytest
import torch

import cocofast
import cocofast.kernels as kernels
import cocofast.ops.similarity.functional as similarity
from cocofast.kernels import gram as gram_module
from cocofast.ops import selfcheck
from reference import features


@pytest.fixture(autouse=True)
def checking():
    selfcheck.configure(True)
    selfcheck.reset()
    yield
    selfcheck.configure(None)
    selfcheck.reset()


@pytest.fixture
def auto_picks_triton(monkeypatch):
    """`auto` as it decides on a GPU where the model favours the fused kernels (on CPU it picks gram)."""
    monkeypatch.setattr(similarity, "similarity_auto_backend", lambda f1, f2: "triton")


@pytest.fixture
def wrong_values(monkeypatch):
    real = kernels.gram_stats

    def off(*args, **kwargs):
        k, p, q = real(*args, **kwargs)
        return k * 1.001, p, q  # φ off by 1e-3, far above fp32's 1e-5

    monkeypatch.setattr(kernels, "gram_stats", off)


@pytest.fixture
def wrong_gradients(monkeypatch):
    real = gram_module.gram_backward
    monkeypatch.setattr(gram_module, "gram_backward",
                        lambda *a, **kw: [None if g is None else g * 1.01 for g in real(*a, **kw)])


def maps(seed=0):
    f1 = features(seed, 2, 24, 5, 7, torch.float32).requires_grad_(True)
    f2 = features(seed + 1, 2, 40, 7, 5, torch.float32).requires_grad_(True)
    return f1, f2


def test_a_sound_kernel_class_is_checked_once_and_kept():
    f1, f2 = maps()
    first = cocofast.cross_layer_correlation(f1, f2, backend="triton")
    cost = selfcheck.cost_seconds()
    assert cost > 0 and list(selfcheck.verdicts().values()) == ["triton"]
    again = cocofast.cross_layer_correlation(f1, f2, backend="triton")
    assert selfcheck.cost_seconds() == cost and torch.equal(first, again)  # no second check
    # Another class (C = 64: other tiles) gets its own check.
    cocofast.cross_layer_correlation(features(5, 2, 64, 5, 7, torch.float32), f2, backend="triton")
    assert len(selfcheck.verdicts()) == 2 and selfcheck.cost_seconds() > cost


def test_wrong_values_make_auto_warn_once_and_fall_back_to_gram(auto_picks_triton, wrong_values):
    f1, f2 = maps()
    want = cocofast.cross_layer_correlation(f1, f2, backend="gram")
    with pytest.warns(RuntimeWarning, match=r"failed their self-check \(φ off by 0\.00[0-9]+ relative") as caught:
        got = cocofast.cross_layer_correlation(f1, f2, backend="auto")
    assert "backend='gram' for this kernel class" in str(caught[0].message)
    assert torch.equal(got, want)  # the gram path ran, not the wrong kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second batch of the class neither warns nor re-checks
        assert torch.equal(cocofast.cross_layer_correlation(f1, f2, backend="auto"), want)
    (g,) = torch.autograd.grad(cocofast.cross_layer_correlation(f1, f2).sum(), [f1])
    (g_gram,) = torch.autograd.grad(cocofast.cross_layer_correlation(f1, f2, backend="gram").sum(), [f1])
    assert torch.equal(g, g_gram)


def test_wrong_gradients_alone_are_caught(auto_picks_triton, wrong_gradients):
    f1, f2 = maps()
    with pytest.warns(RuntimeWarning, match=r"gradients by 0\.01"):
        cocofast.coco_loss([(f1.detach(), f2.detach())], [(f1, f2)], backend="auto")
    assert list(selfcheck.verdicts().values()) == ["gram"]


def test_explicit_triton_raises_with_the_figures(wrong_values):
    f1, f2 = maps()
    with pytest.raises(selfcheck.KernelSelfCheckError, match=r"disagree on this batch: φ off by .* maps \(2, 24, 5, 7\)"):
        cocofast.cross_layer_correlation(f1, f2, backend="triton")
    with pytest.raises(selfcheck.KernelSelfCheckError, match="earlier in this process"):
        cocofast.cross_layer_correlation(f1, f2, backend="triton")


def test_switched_off_nothing_is_checked(wrong_values):
    selfcheck.configure(False)
    f1, f2 = maps()
    got = cocofast.cross_layer_correlation(f1, f2, backend="triton")
    assert not torch.allclose(got, cocofast.cross_layer_correlation(f1, f2, backend="gram"), rtol=1e-4)
    assert selfcheck.cost_seconds() == 0 and not selfcheck.verdicts()


def test_by_default_only_cuda_devices_are_checked():
    selfcheck.configure(None)
    assert not selfcheck.active(torch.device("cpu")) and selfcheck.active(torch.device("cuda", 0))


def test_bad_input_is_still_a_value_error_not_a_failed_check(auto_picks_triton):
    f1, f2 = maps()
    bad = f2.detach().clone()
    bad[1, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="`deep` .* contains NaN"):
        cocofast.cross_layer_correlation(f1, bad, backend="auto")
    assert not selfcheck.verdicts()


def test_the_training_config_key_switches_it(monkeypatch):
    from cocofast.train.config import TrainConfig
    from cocofast.train.student import build_losses

    seen = []
    monkeypatch.setattr(selfcheck, "configure", seen.append)
    for value in (True, False):
        cfg = TrainConfig()
        cfg.kernel_self_check = value
        build_losses(cfg)
    assert seen == [None, False]
