"""The traffic counter, one set of rules for kernels and torch ops: exact bytes on a kernel whose traffic is
known by hand, masked-out elements not counted, re-reads counted as issued but once in the DRAM model, torch
ops counted alike inside and outside a kernel count, and the table's multiples: the fused Gram path reads
each map once per launch and writes each gradient once, and sits near its floor; the eager gram path's own
list of passes matches what its ops move."""
import pytest
import torch

from cocofast.kernels.cmss_rows import MixedRows, channel_extrema
from cocofast.kernels.launcher import gpu_tiles
from cocofast.ops.similarity.auto import TRITON_BACKWARD_PASSES, TRITON_FORWARD_PASSES
from cocofast.ops.similarity.gram_torch import TorchGramStats, traffic
from cocofast.perf.traffic import TrafficCounter, count_traffic, fitted_traffic, path_traffic


def rows_of(report, kernel):
    return {r.tensor: r for r in report.rows if r.kernel == kernel}


def test_row_norm_moves_each_map_element_once_and_writes_one_norm_per_pixel():
    f = torch.randn(2, 24, 5, 7)  # N = 35: the row block (64 or more) masks out 29+ padded rows
    holder = {}
    report = count_traffic(lambda: holder.setdefault("rows", MixedRows(f, False, 1e-6, torch.float32)))
    row_norm = rows_of(report, "row_norm_kernel")
    assert row_norm["f_ptr"].loads == row_norm["f_ptr"].dram_loads == f.numel() * 4
    assert row_norm["norm_ptr"].stores == 2 * 35 * 4 and row_norm["norm_ptr"].loads == 0
    # The weights are re-read by every program (issued) but are 2·24 floats of DRAM.
    assert row_norm["w_ptr"].dram_loads == 2 * 24 * 4 <= row_norm["w_ptr"].loads
    assert "f_ptr" not in {r.tensor for r in report.rows if r.kernel != "row_norm_kernel"}


def test_a_strided_view_counts_only_the_elements_it_touches():
    base = torch.randn(1, 48, 6, 6)
    f = base[:, ::2]  # every other channel of a bigger storage
    report = count_traffic(lambda: MixedRows(f, False, 1e-6, torch.float32))
    assert rows_of(report, "row_norm_kernel")["f_ptr"].dram_loads == f.numel() * 4


def test_channel_extrema_reads_each_map_element_once():
    f = torch.randn(2, 40, 9, 7)
    report = count_traffic(lambda: channel_extrema(f, torch.float32))
    ext = rows_of(report, "channel_extrema_kernel")
    assert ext["f_ptr"].loads == ext["f_ptr"].dram_loads == f.numel() * 4


@pytest.mark.parametrize("c1, c2", [(24, 24), (256, 256), (256, 24)])
def test_triton_path_reads_each_map_once_per_launch_and_writes_each_gradient_once(c1, c2):
    r = path_traffic("triton", c1, c2, side=8)
    assert r["minimum_forward"] == (c1 + c2) * 64 * 4 and r["minimum_backward"] == 2 * r["minimum_forward"]
    fwd = {(x.kernel, x.tensor): x for x in r["forward"].rows}
    bwd = {(x.kernel, x.tensor): x for x in r["backward"].rows}
    for i, c in ((1, c1), (2, c2)):
        one_map = c * 64 * 4
        assert fwd[("gram_forward_kernel", f"f{i}_ptr")].dram_loads == one_map
        assert bwd[("gram_backward_kernel", f"f{i}_ptr")].dram_loads == one_map
        assert bwd[("gram_backward_kernel", f"df{i}_ptr")].dram_stores == one_map
        assert ("gram_backward_kernel", f"df{i}_ptr") not in {k for k, v in bwd.items() if v.loads}
    # The forward has exactly one more pass over the maps (the channel max) and no other kernels.
    assert {k for k, _ in fwd if not k.startswith("torch.")} == {"channel_extrema_kernel", "gram_forward_kernel"}
    assert {k for k, _ in bwd if not k.startswith("torch.")} == {"gram_backward_kernel", "maxpool_add_kernel"}


@pytest.mark.parametrize("c", [24, 256])
def test_triton_path_at_a_production_size_is_near_its_floor(c):
    # With channel mixing the forward reads each map twice: the softmax weights of every row need the max
    # over all N first, so (2 + 2) / (1 + 2) = 4/3 is the floor; C×C partials and N-vectors add the rest.
    mixed = fitted_traffic("triton", c, c)
    assert 4 / 3 <= mixed["dram_multiple"] <= 1.37, mixed
    assert mixed["dram_multiple_forward"] <= 2.06 and mixed["dram_multiple_backward"] <= 1.03, mixed
    # Without it (the SS ablation) one forward pass finds the Grams, the norms and the input check's extrema.
    plain = fitted_traffic("triton", c, c, mix=False)
    assert plain["dram_multiple"] <= 1.3 and plain["dram_multiple_forward"] <= 1.1, plain


def test_the_tile_walks_report_against_their_own_minimum():
    """At the GPU's 64-pixel tiles and N = 256 (4 row blocks, so the walk minimum is 4× the plain one),
    the walk minimum is the formula's figure, and each walk kernel issues exactly twice it: a program
    re-reads its own row block at every step of the walk (one tile from L1/L2, not a new stream)."""
    m1, m2 = 24 * 256 * 4, 40 * 256 * 4  # one (1, C, 16, 16) fp32 map
    with gpu_tiles():
        tiled = path_traffic("tiled", 24, 40, side=16)
        relation = path_traffic("pixel_relation", 40, 24, side=16)
    assert tiled["walk_minimum_forward"] == 4 * (m1 + m2) == relation["walk_minimum_forward"]
    # Backward: one program per 32-wide output tile of each map with a gradient (24: 1 tile, 40: 2).
    assert tiled["walk_minimum_backward"] == (1 + 2) * 4 * (m1 + m2) + m1 + m2
    assert relation["walk_minimum_backward"] == 1 * 4 * (m1 + m2) + m1  # the student (24) has the gradient
    for r, kernel, names in ((tiled, "tiled_forward_kernel", ("f1_ptr", "f2_ptr")),
                             (relation, "pixel_relation_forward_kernel", ("ft_ptr", "fs_ptr"))):
        rows = rows_of(r["forward"], kernel)
        assert sum(rows[n].loads for n in names) == 2 * r["walk_minimum_forward"], kernel
    assert 1.0 < tiled["walk_multiple"] < tiled["issued_multiple"] / 3  # the walk, not the plain minimum


def test_auto_models_the_fused_path_with_the_counted_passes():
    """roofline's TRITON_*_PASSES are the counter's figures at the GPU tiles and row splits (24/24, the
    largest of the production pairs; 256/256 and 256/24 count 2.03 and 1.015), rounded up to 0.01."""
    with gpu_tiles():
        r = fitted_traffic("triton", 24, 24)
    fwd, bwd_reads = r["dram_multiple_forward"], 2 * r["dram_multiple_backward"] - 1
    assert TRITON_FORWARD_PASSES - 0.01 < fwd <= TRITON_FORWARD_PASSES, fwd
    assert TRITON_BACKWARD_PASSES - 0.01 < bwd_reads <= TRITON_BACKWARD_PASSES, bwd_reads


def test_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        count_traffic(lambda: None)


def test_gram_traffic_model_matches_counted_bytes():
    """gram_torch.traffic lists the passes of the code; the counter sees the ops actually run."""
    for c1, c2 in ((24, 40), (64, 64)):
        f1 = torch.randn(2, c1, 128, 128).relu_().requires_grad_(True)
        f2 = torch.randn(2, c2, 128, 128).requires_grad_(True)
        with TrafficCounter() as counter:
            torch.aminmax(f1.detach()), torch.aminmax(f2.detach())  # the public call's input checks
            k, p, q = TorchGramStats.apply(f1, f2, True, 1e-6)
            (k / (p * q).sqrt()).sum().backward()
        model = sum(nbytes for _, nbytes, _ in traffic(2, 128 * 128, c1, c2))
        assert 0.95 < counter.total_bytes / model < 1.1, (c1, c2, counter.total_bytes / model)


def test_traffic_counter_counts_reads_writes_and_skips_views():
    x, y = torch.randn(1000), torch.randn(1000)
    with TrafficCounter() as counter:
        z = x * x           # x read once, z written
        x.view(10, 100).t()  # a view moves nothing
        torch.add(x, y, out=z)  # out= is only written
    assert counter.total_bytes == (4000 + 4000) + (8000 + 4000)


def test_torch_ops_count_alike_in_the_kernel_counter_and_alone():
    """One rule for torch ops: the same eager code moves the same bytes, op by op, in count_traffic (the
    kernels' counter, which also counts the torch ops between launches) as in TrafficCounter."""
    x, y = torch.randn(1000), torch.randn(1000)

    def eager():
        z = x * x
        torch.add(x, y, out=z)
        torch.zeros(500)  # a fill: written only
        return z.sum()

    with TrafficCounter() as alone:
        eager()
    assert alone.total_bytes == (4000 + 4000) + (8000 + 4000) + 2000 + (4000 + 4)
    assert alone.by_op["mul"] == 8000 and alone.calls["zeros"] == 1
    in_kernel_counter = count_traffic(eager)
    assert [(r.kernel, r.loads, r.stores) for r in in_kernel_counter.rows] == \
        [(r.kernel, r.loads, r.stores) for r in alone.report.rows]
