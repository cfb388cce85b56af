"""cocofast.models: registry, the four segmentation networks, taps, paraphraser, discriminator, report."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cocofast.models import (
    SEGMENTATION_MODELS,
    FeatureTaps,
    SegOutput,
    TapNotFoundError,
    TappedModel,
    count_macs,
    count_parameters,
    create_model,
    list_models,
    scale_channels,
    unwrap_model,
)
from cocofast.models import __main__ as report

# Parameters of the authors' public model files for in_channels=1, num_classes=2; the taps' channels.
AUTHORS_PARAMS = {"fanet": 38_292_295, "mobile_unet": 4_682_323, "erfnet": 2_063_130, "enet": 348_996}
TAP_CHANNELS = {"fanet": (256, 256), "mobile_unet": (24, 24), "erfnet": (64, 64), "enet": (64, 64)}
# Parameters of the authors' files that feed no output, left out of ours (see fanet.py, erfnet.py).
UNUSED_IN_AUTHORS = {"fanet": 64 * 2 + 2 + 3, "erfnet": 128 * 2 + 2, "mobile_unet": 0, "enet": 0}
# Small but real configurations for running on CPU: (width, side). Students run at the paper width.
SMALL = {"fanet": (0.125, 32), "mobile_unet": (1.0, 64), "erfnet": (1.0, 32), "enet": (1.0, 32)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny; on a shared 2-core machine a second OpenMP thread only adds spin-wait.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_model(name: str, in_channels: int = 3, num_classes: int = 2):
    torch.manual_seed(0)
    width, side = SMALL[name]
    model = create_model(name, in_channels=in_channels, num_classes=num_classes, width=width)
    x = torch.rand(2, in_channels, side, side, generator=torch.Generator().manual_seed(1))
    return model, x


# ---------------------------------------------------------------- registry


def test_registry_lists_every_network():
    assert set(list_models()) == {"fanet", "mobile_unet", "erfnet", "enet", "paraphraser", "discriminator"}
    assert set(SEGMENTATION_MODELS) <= set(list_models())


def test_unknown_model_and_argument_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'fanett'.*did you mean 'fanet'"):
        create_model("fanett")
    with pytest.raises(TypeError, match=r"create_model\('enet'\).*widht"):
        create_model("enet", widht=0.5)


def test_create_model_records_how_to_rebuild_it(tmp_path):
    model = create_model("erfnet", in_channels=1, num_classes=3, width=0.25)
    assert model.model_name == "erfnet" and model.model_kwargs == dict(in_channels=1, num_classes=3, width=0.25)
    path = tmp_path / "ckpt.pt"
    torch.save({"models": {"student": {"model_name": model.model_name, "model_kwargs": model.model_kwargs,
                                       "state_dict": model.state_dict()}}}, path)
    entry = torch.load(path, weights_only=True)["models"]["student"]
    rebuilt = create_model(entry["model_name"], **entry["model_kwargs"])
    rebuilt.load_state_dict(entry["state_dict"])
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)


def test_scale_channels():
    assert [scale_channels(c, 1.0) for c in (16, 24, 32, 64, 96, 128, 160, 256, 320, 512, 1280)] == [
        16, 24, 32, 64, 96, 128, 160, 256, 320, 512, 1280]
    assert scale_channels(256, 0.125) == 32 and scale_channels(16, 0.125) == 4
    with pytest.raises(ValueError, match="width must be > 0"):
        scale_channels(64, 0.0)


# ---------------------------------------------------------------- parameter counts and tap shapes (paper size)


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_parameter_count_matches_authors_files(name):
    with torch.device("meta"):  # counting needs no memory: FANet is 38M parameters
        model = create_model(name, in_channels=1, num_classes=2)
    ours = count_parameters(model)
    assert abs(ours - AUTHORS_PARAMS[name]) <= 0.005 * AUTHORS_PARAMS[name]
    # Exact accounting: the whole difference is the parameters left out because no output uses them.
    assert ours + UNUSED_IN_AUTHORS[name] == AUTHORS_PARAMS[name]


def test_parameters_without_batchnorm_match_paper_table():
    # The paper's table counts FANet and Mobile U-Net without BatchNorm (38.250M and 4.640M).
    with torch.device("meta"):
        fanet = create_model("fanet", in_channels=1)
        munet = create_model("mobile_unet", in_channels=1)
    assert round(count_parameters(fanet, include_batchnorm=False) / 1e6, 3) == 38.250
    assert round(count_parameters(munet, include_batchnorm=False) / 1e6, 3) == 4.640
    assert count_parameters(fanet, include_batchnorm=False) < count_parameters(fanet)


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_paper_size_taps_on_meta(name):
    with torch.device("meta"):
        model = create_model(name, in_channels=1, num_classes=2)
        out = model(torch.empty(2, 1, 64, 64))
    assert model.tap_channels == TAP_CHANNELS[name]
    assert out.logits.shape == (2, 2, 64, 64)
    assert out.shallow.shape == (2, *TAP_CHANNELS[name][:1], 16, 16)
    assert out.deep.shape == (2, TAP_CHANNELS[name][1], 16, 16)


# ---------------------------------------------------------------- running the networks


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_forward_backward_shapes_and_every_parameter_learns(name):
    model, x = small_model(name)
    model.train()
    out = model(x)
    assert isinstance(out, SegOutput)
    b, _, h, w = x.shape
    assert out.logits.shape == (b, 2, h, w)
    assert out.shallow.shape == (b, model.tap_channels[0], h // 4, w // 4)
    assert out.deep.shape == (b, model.tap_channels[1], h // 4, w // 4)
    loss = F.cross_entropy(out.logits, torch.randint(0, 2, (b, h, w))) + out.shallow.mean() + out.deep.mean()
    loss.backward()
    # Every parameter must get a gradient: DistributedDataParallel fails on unused ones.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_declared_tap_paths_give_the_returned_taps(name):
    model, x = small_model(name)
    model.eval()
    with torch.no_grad(), FeatureTaps(model, model.tap_paths) as taps:
        out = model(x)
        assert taps[model.tap_paths[0]] is out.shallow
        assert taps[model.tap_paths[1]] is out.deep


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_channels_last_gives_the_same_outputs(name):
    model, x = small_model(name)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_bf16_autocast_on_cpu(name):
    model, x = small_model(name)
    model.eval()
    with torch.no_grad():
        reference = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits.float()
    # bf16 keeps ~3 significant digits. ENet agrees less: bf16 rounding flips ~1% of its max-pool argmaxes, and
    # max-unpooling then puts those values at other pixels (its encoder alone agrees to 0.99999).
    cosine = F.cosine_similarity(low.flatten(), reference.flatten(), dim=0)
    assert cosine >= (0.98 if name == "enet" else 0.9995), cosine
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.logits.float().logsumexp(dim=1).mean() + out.shallow.float().mean() + out.deep.float().mean()
    loss.backward()
    assert out.logits.shape == reference.shape
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_indivisible_input_is_a_clear_error(name):
    model, _ = small_model(name)
    d = model.input_divisor
    side = 2 * d + d // 2
    with pytest.raises(ValueError, match=rf"divisible by {d}, got {side}x{2 * d}"):
        model(torch.zeros(1, 3, side, 2 * d))
    with pytest.raises(ValueError, match=r"built for 3 input channels, got 1"):
        model(torch.zeros(1, 1, 2 * d, 2 * d))


def test_too_many_input_channels_for_enet_and_erfnet():
    for name in ("enet", "erfnet"):
        with pytest.raises(ValueError, match=r"in_channels must be below"):
            create_model(name, in_channels=4, width=0.125)


# ---------------------------------------------------------------- taps by path


def test_missing_tap_names_the_path_and_nearest_names():
    model = create_model("erfnet", width=0.25)
    with pytest.raises(TapNotFoundError) as info:
        FeatureTaps(model, ["encoder.layer.0"])
    message = str(info.value)
    assert "'encoder.layer.0'" in message and "'encoder.layers.0'" in message
    with pytest.raises(TapNotFoundError, match=r"'decoder\.layers\.9'.*'decoder\.layers\.\d'"):
        TappedModel(model, "encoder.layers.0", "decoder.layers.9")


class TinyUNet(nn.Module):
    """A user's own network: plain tensor output, no SegOutput."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(4), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(8 + 16, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        d = self.mid(self.down(s))
        return self.head(torch.cat([s, F.interpolate(d, scale_factor=4)], dim=1))


def test_tapped_model_turns_any_network_into_seg_output():
    net = TinyUNet()
    tapped = TappedModel(net, "down.2", "mid", input_divisor=4)
    x = torch.rand(2, 3, 16, 16)
    out = tapped(x)
    assert out.logits.shape == (2, 2, 16, 16)
    assert out.shallow.shape == out.deep.shape == (2, 16, 4, 4)
    assert tapped.tap_channels == (16, 16)
    torch.testing.assert_close(out.logits, net(x))
    torch.testing.assert_close(out.deep, net.mid(net.down(net.stem(x))))
    with pytest.raises(ValueError, match=r"divisible by 4, got 18x16"):
        tapped(torch.rand(1, 3, 18, 16))


def test_tapped_model_reads_dict_outputs():
    class DictNet(TinyUNet):
        def forward(self, x):
            return {"out": super().forward(x), "aux": None}

    out = TappedModel(DictNet(), "stem", "stem")(torch.rand(1, 3, 8, 8))
    assert out.logits.shape == (1, 2, 8, 8) and out.shallow.shape == (1, 8, 8, 8)


def test_taps_see_through_a_module_wrapper_with_either_path_spelling():
    class Wrapper(nn.Module):  # the `.module` convention of DataParallel-style wrappers
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    net = TinyUNet()
    wrapped = Wrapper(Wrapper(net))
    assert unwrap_model(wrapped) is net
    x = torch.rand(1, 3, 8, 8)
    for path in ("mid", "module.module.mid"):
        with FeatureTaps(wrapped, [path]) as taps:
            wrapped(x)
            torch.testing.assert_close(taps[path], net.mid(net.down(net.stem(x))))


def test_taps_see_through_distributed_data_parallel():
    import torch.distributed as dist

    if dist.is_initialized() or not dist.is_gloo_available():
        pytest.skip("needs a fresh gloo process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = TinyUNet()
        ddp = nn.parallel.DistributedDataParallel(net)
        tapped = TappedModel(ddp, "module.down.2", "mid")  # both spellings resolve
        assert unwrap_model(ddp) is net
        out = tapped(torch.rand(2, 3, 8, 8))
        assert out.shallow.shape == (2, 16, 2, 2) and out.logits.shape == (2, 2, 8, 8)
        out.logits.sum().backward()
        assert net.head.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_taps_see_through_torch_compile_wrapper():
    model = create_model("enet", width=0.25)
    compiled = torch.compile(model)  # an OptimizedModule holding `_orig_mod`; not run here
    assert unwrap_model(compiled) is model
    taps = FeatureTaps(compiled, compiled._orig_mod.tap_paths)
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 32, 32))
    assert taps["regular1_4"] is out.shallow and taps["regular4_2"] is out.deep
    taps.remove()
    with pytest.raises(TapNotFoundError, match=r"'_orig_mod\.regular1_5'.*'regular1_\d'"):
        FeatureTaps(compiled, ["_orig_mod.regular1_5"])


def test_taps_fire_inside_a_compiled_model():
    # Registered before the first compiled call, hooks are traced into the graph (eager backend: no compiler).
    net = TinyUNet()
    tapped = TappedModel(torch.compile(net, backend="eager"), "down.2", "mid")
    x = torch.rand(1, 3, 8, 8)
    out = tapped(x)
    torch.testing.assert_close(out.deep, net.mid(net.down(net.stem(x))))


def test_tap_that_did_not_run_is_reported():
    net = TinyUNet()
    net.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(RuntimeError, match=r"tap 'unused' did not fire"):
        TappedModel(net, "stem", "unused")(torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------- paraphraser and discriminator


def test_paraphraser_encode_decode_and_size():
    torch.manual_seed(0)
    para = create_model("paraphraser", in_channels=32, k=8)
    c, k = 32, 8
    conv = lambda i, o: i * o * 9 + o  # noqa: E731 - 3x3 kernel + bias
    assert count_parameters(para) == conv(c, c) + conv(c, k) + conv(k, k) + conv(k, k) + conv(k, c) + conv(c, c)
    x = torch.randn(2, c, 8, 8)
    factor = para.encode(x)
    assert factor.shape == (2, k, 8, 8)
    recon = para(x)
    assert recon.shape == x.shape
    torch.testing.assert_close(recon, para.decode(factor))
    F.mse_loss(recon, x).backward()
    assert all(p.grad is not None for p in para.parameters())
    with pytest.raises(ValueError, match=r"expects \(B, 32, H, W\), got shape \(2, 16, 8, 8\)"):
        para.encode(torch.randn(2, 16, 8, 8))


@pytest.mark.parametrize("c, k", [(64, 24), (64, 64), (256, 24)])
def test_paraphraser_keeps_the_signal_scale_at_initialisation(c, k):
    # A zero-mean tap (FANet's up_7) must come out of a fresh paraphraser at a comparable scale, or SGD stalls
    # at the all-zero reconstruction; torch's default init returns about 2 % of the input's std here.
    torch.manual_seed(0)
    para = create_model("paraphraser", in_channels=c, k=k)
    x = torch.randn(4, c, 16, 16)
    with torch.no_grad():
        z = para.encode(x)
        assert 0.3 < z.std().item() < 3
        hidden = F.leaky_relu(para.deconv1(F.leaky_relu(para.deconv0(z), 0.1)), 0.1)
        assert 0.3 < hidden.std().item() < 3  # what the last layer's weights first learn from
        # The last layer starts at zero: the reconstruction error starts at the tap's mean square.
        assert not para(x).any()
    assert all(not layer.bias.any() for layer in (para.conv0, para.deconv2))


def test_paraphraser_matches_a_float64_reference():
    para = create_model("paraphraser", in_channels=6, k=3).double()
    x = torch.randn(1, 6, 5, 7, dtype=torch.float64)
    h = x
    for conv in (para.conv0, para.conv1, para.conv2):
        h = torch.where(conv(h) > 0, conv(h), 0.1 * conv(h))
    torch.testing.assert_close(para.encode(x), h)


@pytest.mark.parametrize("in_channels", [2 + 3, 2])  # [probabilities, RGB image] (paper), logits only (code)
def test_discriminator_scores_and_gradient_penalty(in_channels):
    torch.manual_seed(0)
    critic = create_model("discriminator", in_channels=in_channels, width=0.125)
    assert any("parametrizations" in n for n, _ in critic.named_modules())  # spectral norm in place
    real, fake = torch.rand(2, in_channels, 64, 64), torch.rand(2, in_channels, 64, 64)
    assert critic(real).shape == (2,)
    # WGAN-GP: the critic must be differentiable twice.
    alpha = torch.rand(2, 1, 1, 1)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = -critic(real).mean() + critic(fake).mean() + 10 * penalty
    loss.backward()
    grads = [p.grad for p in critic.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert critic.attn1.gamma.grad is not None and critic.attn2.gamma.grad.abs().item() > 0


def test_discriminator_input_errors():
    critic = create_model("discriminator", in_channels=3, width=0.125)
    with pytest.raises(ValueError, match=r">= 64 and divisible by 16, got 48x64"):
        critic(torch.rand(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"in_channels=3"):
        critic(torch.rand(1, 5, 64, 64))


# ---------------------------------------------------------------- the report


def test_flops_counted_on_meta_equal_flops_counted_on_cpu():
    model, x = small_model("enet")
    model.eval()
    cpu = count_macs(model, x)
    with torch.device("meta"):
        meta_model = create_model("enet", width=SMALL["enet"][0]).eval()
        meta = count_macs(meta_model, torch.empty_like(x, device="meta"))
    assert cpu == meta > 0


def test_report_prints_the_measured_counts(capsys):
    assert report.main(["--sizes", "64"]) == 0
    text = capsys.readouterr().out
    for name, spec in AUTHORS_PARAMS.items():
        with torch.device("meta"):
            ours = count_parameters(create_model(name, in_channels=1, num_classes=2))
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{ours:,}" in row and f"{spec:,}" in row and f"{ours - spec:+,}" in row
    assert "GMACs @64²" in text and "FLOPs / 2" in text
