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


@pytest.mark.skipif(torch.bfloat16 not in cpu_packing.PACKED_DTYPES, reason="no native bfloat16 on this CPU")
@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_bfloat16_packed_product_rounds_the_float32_sum_once(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(256, 72, generator=gen).bfloat16()  # [K, N]
    x = torch.randn(rows, 256, generator=gen).bfloat16()
    got = packed_matmul(x, pack_weight(w))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 72)
    # The exact sum rounded once to bfloat16 is within half a bfloat16 ulp; float32 accumulation in a
    # different order may land one ulp away, never further.
    exact = x.double() @ w.double()
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -7, atol=1e-3)


def test_bfloat16_is_packed_only_with_native_support():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (pack_weight(torch.zeros(4, 4, dtype=torch.bfloat16)) is not None) == native
