"""The interpreter traffic counter: exact bytes on a kernel whose traffic is known by hand, masked-out
elements not counted, re-reads counted as issued but once in the DRAM model, and the table's multiples."""
import pytest
import torch

from cocofast.kernels.cmss_rows import MixedRows
from cocofast.kernels.traffic import count_traffic, path_traffic


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


@pytest.mark.parametrize("c", [24, 256])
def test_gram_path_reads_each_map_at_least_once_and_reports_multiples(c):
    r = path_traffic("gram", c, c, side=8)
    assert r["minimum_forward"] == 2 * c * 64 * 4 and r["minimum_backward"] == 2 * r["minimum_forward"]
    assert r["forward"].dram_bytes >= r["minimum_forward"]
    assert r["backward"].dram_bytes >= r["minimum_backward"]
    assert 1.0 <= r["dram_multiple"] <= r["issued_multiple"]
    kernels = set(r["forward"].by_kernel()) | set(r["backward"].by_kernel())
    assert {"row_norm_kernel", "gram_partial_kernel", "grad_rows_kernel", "chain_backward_kernel"} <= kernels


def test_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        count_traffic(lambda: None)
