"""float32 weights packed for oneDNN on CPU (kernels.cpu_packing): same results as the plain product,
and a bounded set of row counts reaching oneDNN whatever the batch sizes."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_packing
from kernels.cpu_moe import float32_mm
from kernels.cpu_packing import pack_weight, packed_matmul, padded_rows

pytestmark = pytest.mark.skipif(pack_weight(torch.zeros(2, 2)) is None, reason="torch built without oneDNN")


def test_row_counts_are_bounded_and_padding_small():
    counts = [padded_rows(n) for n in range(1, 8193)]
    assert counts[:cpu_packing.EXACT_ROWS] == list(range(1, cpu_packing.EXACT_ROWS + 1))
    assert all(p >= n for n, p in zip(range(1, 8193), counts))
    assert max((p - n) / n for n, p in zip(range(1, 8193), counts)) <= 1 / cpu_packing.ROUNDINGS_PER_OCTAVE
    assert counts == sorted(counts)
    # 16 exact counts, then 8 per octave up to 8192: what oneDNN keeps state for stays small.
    assert len(set(counts)) == 16 + 8 * 9


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 17, 33, 100, 257])
def test_packed_and_padded_products_match_the_plain_one(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=gen)  # [K, N]
    x = torch.randn(rows, 96, generator=gen)
    expected = x.double() @ w.double()
    for got in (packed_matmul(x, pack_weight(w)), float32_mm(x, w), float32_mm(x, w.t().contiguous().t())):
        assert got.shape == (rows, 80)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
