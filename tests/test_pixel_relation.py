"""CPKD pixel-relation KL: every backend against an independent float64 reference, and the kernels' GPU compile."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import cocofast.ops.pixel_relation as pr
from cocofast.kernels.pixel_relation import pixel_relation_rows
from cocofast.ops.pixel_relation.chunked_torch import chunked_rows, rows_per_block
from cocofast.ops.similarity import cmss
from reference import rows as ref_rows
from reference import DEVICE, features

@pytest.fixture(scope="module", autouse=True)
def gpu_compile_job():
    """The sm_80/sm_90 compile (~20 s without Triton's cache) runs in a child process beside the other tests of
    this file; the last test collects it. fp32 maps only, for time: half-precision maps differ in the loads
    alone (every dot runs on fp32 tiles); `python -m cocofast.perf.gpu_compile --paths pixel_relation` compiles both."""
    code = ("import json; from cocofast.perf.gpu_compile import check_all; "
            "rows = check_all(pairs=((40, 24),), dtypes=('float32',), shapes=((8, 256),), paths=('pixel_relation',)); "
            "print(json.dumps([r for r in rows if r['kernel'].startswith('pixel_relation')]))")
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield job
    if job.poll() is None:
        job.kill()
        job.communicate()


BACKENDS = ["naive", "chunked", "triton"]
# Values and gradients (norm-wise), relative: fp32 inputs 1e-5, half-precision inputs 1e-2.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def ref_kl_rows(ft, fs, tau=1.0, channel_mix=False):
    """(B, N) KL(P_T[i] ‖ P_S[i]) in float64 numpy, from explicit N×N matrices."""
    out = []
    for a, b in zip(ft.detach().double().cpu().numpy(), fs.detach().double().cpu().numpy()):
        logp = []
        for f in (a, b):
            x = ref_rows(f, channel_mix)
            r = x @ x.T / tau
            top = r.max(axis=1, keepdims=True)
            logp.append(r - top - np.log(np.exp(r - top).sum(axis=1, keepdims=True)))
        out.append((np.exp(logp[0]) * (logp[0] - logp[1])).sum(axis=1))
    return np.array(out)


def rel(got, want):
    got, want = torch.as_tensor(got, dtype=torch.float64).cpu(), torch.as_tensor(want, dtype=torch.float64).cpu()
    return ((got - want).norm() / want.norm()).item()


def loss(ft, fs, backend, **kw):
    return pr.pixel_relation_kl(ft, fs, backend=backend, **kw)


def grad_of(fn, fs):
    """dL/dF_S of a scalar loss function of the student map."""
    x = fs.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), [x])
    return g


# (dtype, C_T, C_S, teacher (H, W), student (H, W), channel_mix, tau, relu, kernel tile or None = default)
CASES = [
    (torch.float32, 3, 24, (5, 7), (7, 5), False, 1.0, False, 16),   # N = 35: 3 tiles, ragged last one
    (torch.float32, 40, 3, (9, 11), (11, 9), True, 0.5, True, 32),   # N = 99, dead pixels from the ReLU
    (torch.float32, 24, 40, (17, 19), (17, 19), False, 1.0, False, None),  # N = 323: 2 default tiles
    (torch.float32, 24, 24, (6, 6), (4, 9), True, 0.05, False, 16),  # logits up to ±20: online max at work
    (torch.float16, 24, 40, (6, 5), (5, 6), False, 0.2, False, 16),
    (torch.bfloat16, 40, 24, (7, 7), (7, 7), True, 1.0, True, 16),
    (torch.float64, 3, 40, (3, 13), (13, 3), True, 0.3, False, 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-C{c[1]}x{c[2]}-{c[3]}-mix{c[5]}-tau{c[6]}")
def test_values_and_gradients_match_float64_reference(case):
    dtype, ct, cs, hw_t, hw_s, mix, tau, relu, tile = case
    ft = features(1, 2, ct, *hw_t, dtype, relu)
    fs = features(2, 2, cs, *hw_s, dtype, relu, scale=2.0)
    want_rows = ref_kl_rows(ft, fs, tau, mix)
    want = want_rows.mean()
    tol = TOL[dtype]
    # The flash kernel, per row, at a tile small enough to cross several tile borders.
    got_rows = pixel_relation_rows(ft, fs, tau, mix, block=tile)
    assert got_rows.shape == want_rows.shape
    assert rel(got_rows, want_rows) < tol
    # Gradients: the naive backend in float64 (gradchecked below) is the reference.
    weights = torch.linspace(0.5, 1.5, want_rows.size, device=DEVICE).reshape(want_rows.shape)
    want_grad = grad_of(lambda x: (pr.naive_rows(ft.double(), x, tau, mix) * weights.double()).sum(), fs.double())
    got_grad = grad_of(lambda x: (pixel_relation_rows(ft, x, tau, mix, block=tile) * weights).sum(), fs)
    assert got_grad.dtype == dtype and rel(got_grad, want_grad) < tol
    # The row-block path, 7 rows a block: several blocks per image, the last one ragged for most shapes.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a_t = cmss(ft, channel_mix=mix).to(acc)
    chunked = lambda x: chunked_rows(a_t, cmss(x, channel_mix=mix).to(acc), tau, block=7)  # noqa: E731
    assert rel(chunked(fs), want_rows) < tol
    got_grad = grad_of(lambda x: (chunked(x) * weights.to(acc)).sum(), fs)
    assert got_grad.dtype == dtype and rel(got_grad, want_grad) < tol
    # The public function: the mean, with the kernel at its default tile, and the naive backend.
    want_mean_grad = grad_of(lambda x: pr.naive_rows(ft.double(), x, tau, mix).mean(), fs.double())
    for backend in BACKENDS:
        x = fs.detach().clone().requires_grad_(True)
        value = loss(ft, x, backend, tau=tau, channel_mix=mix)
        assert value.dim() == 0 and value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert abs(value.item() - want) <= tol * want
        value.backward()
        assert rel(x.grad, want_mean_grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    ft = features(11, 2, 5, 3, 2, torch.float64)
    fs = features(12, 2, 3, 2, 3, torch.float64).requires_grad_(True)
    # The interpreted kernels take ~0.1 s a call: fast mode checks random projections of the Jacobian.
    fast = backend == "triton"
    for mix, tau in ((False, 1.0), (True, 0.25)):
        assert torch.autograd.gradcheck(lambda s: loss(ft, s, backend, tau=tau, channel_mix=mix), (fs,),
                                        eps=1e-6, atol=1e-8, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_is_constant_and_identical_maps_give_zero(backend):
    ft = features(21, 2, 24, 4, 5, torch.float32).requires_grad_(True)
    fs = features(22, 2, 40, 5, 4, torch.float32).requires_grad_(True)
    value = loss(ft, fs, backend, channel_mix=True)
    value.backward()
    assert value.item() > 0 and ft.grad is None and torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0
    same = fs.detach().clone().requires_grad_(True)
    zero = loss(fs.detach(), same, backend)
    zero.backward()
    assert abs(zero.item()) < 1e-7 and same.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_pixels_and_dead_maps_stay_finite(backend):
    ft = features(31, 2, 24, 5, 5, torch.float32)
    fs = features(32, 2, 24, 5, 5, torch.float32)
    fs[:, :, 1:3, 2:4] = 0  # zero rows: uniform relation rows, no NaN
    fs[1] = 0  # a whole dead map
    ft[0, :, 0, :] = 0
    fs.requires_grad_(True)
    value = loss(ft, fs, backend, tau=0.5)
    assert abs(value.item() - ref_kl_rows(ft, fs, 0.5).mean()) <= 1e-5 * value.item()
    value.backward()
    assert torch.isfinite(fs.grad).all()


def test_layouts_channels_last_and_strided():
    base = features(41, 2, 24, 6, 10, torch.float32)
    teacher = features(42, 2, 40, 5, 6, torch.float32)
    want = loss(teacher, base[..., ::2].contiguous(), "naive")
    want_grad = grad_of(lambda x: loss(teacher, x, "naive"), base[..., ::2].contiguous())
    layouts = (lambda b: b[..., ::2], lambda b: b[..., ::2].contiguous(memory_format=torch.channels_last))
    for layout in layouts:
        leaf = base.clone().requires_grad_(True)
        view = layout(leaf)  # the kernel reads this layout directly
        assert not view.is_contiguous()
        got = loss(teacher.contiguous(memory_format=torch.channels_last), view, "triton")
        assert abs(got.item() - want.item()) <= 1e-5 * want.item()
        got.backward()
        assert rel(leaf.grad[..., ::2], want_grad) < 1e-5 and not leaf.grad[..., 1::2].any()


def test_kernel_runs_are_bit_identical():
    def run():
        fs = features(51, 2, 40, 5, 7, torch.float32).requires_grad_(True)
        rows = pixel_relation_rows(features(52, 2, 24, 7, 5, torch.float32), fs, 0.5, True, block=16)
        rows.sum().backward()
        return rows.detach(), fs.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_auto_backend_picks_by_device():
    ft, fs = features(61, 2, 24, 4, 4, torch.float32), features(62, 2, 40, 4, 4, torch.float32)
    other = "chunked" if DEVICE == "cpu" else "triton"
    assert torch.equal(pr.pixel_relation_kl(ft, fs), pr.pixel_relation_kl(ft, fs, backend=other))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_value_errors_naming_argument_and_shapes(backend):
    good = torch.randn(2, 4, 5, 6)
    cases = [
        (lambda: loss(good, torch.randn(2, 4, 5, 5), backend), ["f_teacher", "f_student", "(2, 4, 5, 6)",
                                                                 "(2, 4, 5, 5)"]),
        (lambda: loss(torch.randn(4, 5, 6), good, backend), ["f_teacher", "(4, 5, 6)"]),
        (lambda: loss(good, good.to(torch.int32), backend), ["f_student", "torch.int32"]),
        (lambda: loss(good, torch.randn(3, 4, 5, 6), backend), ["f_teacher", "f_student", "(3, 4, 5, 6)"]),
        (lambda: loss(good, good.clone().fill_(float("nan")), backend), ["f_student", "NaN"]),
        (lambda: loss(good, good, backend, tau=0.0), ["tau", "0.0"]),
        (lambda: loss(good, good, backend, tau=float("inf")), ["tau"]),
        (lambda: loss(good, good, backend, channel_mix=1), ["channel_mix"]),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as err:
            call()
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    with pytest.raises(ValueError, match="backend must be one of"):
        loss(good, good, "tiled")
    with pytest.raises(ValueError, match="power of two"):
        pixel_relation_rows(good, good, block=24)


def test_row_blocks_stay_near_64_mib_and_cover_small_maps_whole():
    assert rows_per_block(35) == 35 and rows_per_block(4096) == 4096
    for n, item in ((65536, 4), (262144, 4), (65536, 8)):
        assert rows_per_block(n, item) * n * item == 64 * 2**20
    assert rows_per_block(2**30) == 1
    with pytest.raises(ValueError, match="block"):
        chunked_rows(torch.randn(1, 4, 3), torch.randn(1, 4, 3), 1.0, block=0)


def test_naive_refuses_before_allocating():
    f = torch.randn(8, 1, 256, 256)  # N = 65,536: one fp32 N×N matrix per image is 16 GiB
    with pytest.raises(pr.NaiveTooLargeError, match="N=65536"):
        pr.pixel_relation_kl(f, f, backend="naive")


def test_kernels_compile_for_sm80_and_sm90_at_gpu_tiles(gpu_compile_job):
    """The interpreter accepts code a GPU rejects; ptxas does not. Both kernels, at GPU tile sizes, compile for
    Ampere and Hopper without spills and with their dots on tensor cores."""
    stdout, stderr = gpu_compile_job.communicate(timeout=600)
    assert gpu_compile_job.returncode == 0, stderr[-6000:]
    rows = json.loads(stdout.strip().splitlines()[-1])
    kernels = {"pixel_relation_forward_kernel", "pixel_relation_backward_kernel"}
    assert {(r["kernel"], r["arch"], r["signature"].split(",")[0]) for r in rows} == {
        (k, a, d) for k in kernels for a in ("sm_80", "sm_90") for d in ("*fp32",)}
    from cocofast.perf.gpu_compile import problems

    for r in rows:  # 64×64 pixel tiles reduced over 16-channel tiles (launcher.tile_walk_config)
        assert r["constexprs"]["BLOCK_I"] == 64 and r["constexprs"]["BLOCK_C"] == 16, r
        assert not problems(r) and r["dots"] == r["dots_on_mma"] > 0, r
