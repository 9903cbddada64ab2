"""The compiled decode attention (kernels/csrc/decode_attention.cpp) against the torch path it replaces."""
from __future__ import annotations

import pytest
import torch

from kernels import native
from services.model import paged_attention as pa
from services.model.attention_metadata import AttentionMetadata, PrefillChunk


def _case(dtype, heads, groups, dh, block_size, context_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in context_lens)
    num_blocks = len(context_lens) * width + 3
    k_cache = torch.randn(heads, num_blocks, block_size, dh, generator=g).to(dtype)
    v_cache = torch.randn(heads, num_blocks, block_size, dh, generator=g).to(dtype)
    # Blocks scattered over the cache, tables padded with block 0 as the scheduler pads them.
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int64)
    used = 0
    for i, n in enumerate(context_lens):
        k = -(-n // block_size)
        tables[i, :k] = order[used:used + k]
        used += k
    q = torch.randn(len(context_lens), heads, groups, dh, generator=g).mul_(3).to(dtype)
    meta = AttentionMetadata(torch.zeros(len(context_lens), dtype=torch.int64), tables,
                             torch.tensor(context_lens, dtype=torch.int64))
    return q, k_cache, v_cache, meta


def _both(monkeypatch, q, k_cache, v_cache, meta, multiplier=0.125, softcap=30.0):
    got = pa.paged_attention(q, k_cache, v_cache, meta, multiplier, softcap)
    with monkeypatch.context() as m:
        m.setattr(pa, "_native_decode", lambda: None)
        want = pa.paged_attention(q, k_cache, v_cache, meta, multiplier, softcap)
    return got, want


@pytest.fixture
def compiled():
    if pa._native_decode() is None:
        pytest.skip("kernels/csrc/decode_attention.cpp could not be compiled here (no C++ compiler?)")


@pytest.mark.parametrize("dh", [8, 48, 64, 128])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_float32_matches_torch_path(compiled, monkeypatch, dh, groups):
    q, k, v, meta = _case(torch.float32, 3, groups, dh, 16, [1, 16, 17, 40, 5])
    got, want = _both(monkeypatch, q, k, v, meta)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dh", [8, 64, 128])
@pytest.mark.parametrize("groups", [2, 6])
def test_bfloat16_within_one_rounding_of_torch_path(compiled, monkeypatch, dh, groups):
    q, k, v, meta = _case(torch.bfloat16, 2, groups, dh, 16, [3, 32, 70, 129])
    got, want = _both(monkeypatch, q, k, v, meta)
    # Both sum float32 products of the same bfloat16 values in different orders and round once.
    diff = (got.float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2 ** -7 + 1e-3).all(), diff.max()
    assert (got == want).float().mean() > 0.9


def test_long_context_and_soft_cap(compiled, monkeypatch):
    # Large logits make the soft-cap matter; contexts span many blocks of another block size.
    q, k, v, meta = _case(torch.float32, 2, 2, 64, 8, [300, 1, 257])
    got, want = _both(monkeypatch, q.mul(20), k, v, meta, multiplier=1.0, softcap=5.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_decode_then_prefill_in_one_step(compiled, monkeypatch):
    # A step with decodes and a prefill chunk: only the decode rows take the compiled path.
    q, k, v, meta = _case(torch.float32, 2, 2, 64, 16, [20, 33])
    # The prefill is 3 more tokens of a 20-token sequence held in the second sequence's first blocks.
    chunk = PrefillChunk(query_start=2, query_len=3, context_len=20, block_table=meta.decode_block_tables[1, :2])
    prefill = AttentionMetadata(meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens, (chunk,))
    q_all = torch.cat([q, torch.randn(3, 2, 2, 64)])
    got, want = _both(monkeypatch, q_all, k, v, prefill)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_no_compiler_leaves_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    assert native.library.__wrapped__("decode_attention") is None


def test_compile_error_leaves_the_torch_path(monkeypatch, tmp_path):
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "broken.cpp").write_text("this is not C++")
    monkeypatch.setattr(native, "SOURCES", bad)
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path / "cache")
    assert native.library.__wrapped__("broken") is None
    assert not list((tmp_path / "cache").glob("*.so"))
