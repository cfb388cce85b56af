"""`graph_tap_paths`, the chain of taps Graph Flow distils, on every registered segmentation network."""
from __future__ import annotations

import pytest
import torch

from cocofast.models import FeatureTaps, create_model, list_models

NOT_SEGMENTATION = {"paraphraser", "discriminator"}
SEGMENTATION = [name for name in list_models() if name not in NOT_SEGMENTATION]
SIDE = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors on a shared 2-core machine: a second OpenMP thread only adds spin-wait.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tapped_forward(name: str):
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=2, width=0.25)
    x = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with FeatureTaps(model, model.graph_tap_paths) as taps:
        out = model(x)
        fired = taps.pop()
    return model, x, out, fired


def test_every_segmentation_network_declares_graph_taps():
    assert set(SEGMENTATION) >= {"fanet", "mobile_unet", "erfnet", "enet"}
    for name in SEGMENTATION:
        model = create_model(name, width=0.25)
        paths = model.graph_tap_paths
        assert isinstance(paths, tuple) and 3 <= len(paths) <= 4 and len(set(paths)) == len(paths), name
        # The two CoCo taps are vertices of the graph, shallow before deep.
        assert paths.index(model.tap_paths[0]) < paths.index(model.tap_paths[1]), name


@pytest.mark.parametrize("name", SEGMENTATION)
def test_graph_taps_fire_in_order_as_maps_at_a_quarter(name):
    model, _, out, fired = tapped_forward(name)
    # Hooks record in firing order, so this checks that the declaration runs shallow to deep.
    assert list(fired) == list(model.graph_tap_paths)
    for path, tap in fired.items():
        assert isinstance(tap, torch.Tensor) and tap.dim() == 4, path
        assert tap.shape[0] == 2 and tap.shape[-2:] == (SIDE // 4, SIDE // 4), (path, tuple(tap.shape))
    # The captured CoCo taps are the ones the network returns: nothing later rewrote them in place.
    assert torch.equal(fired[model.tap_paths[0]], out.shallow)
    assert torch.equal(fired[model.tap_paths[1]], out.deep)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_gradient_flows_from_every_graph_tap(name):
    model, x, _, fired = tapped_forward(name)
    stem = next(p for p in model.parameters() if p.dim() == 4)  # the first convolution's weight
    for path, tap in fired.items():
        grad_x, grad_stem = torch.autograd.grad(tap.square().mean(), (x, stem), retain_graph=True)
        for what, grad in (("input", grad_x), ("stem weight", grad_stem)):
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, (path, what)
