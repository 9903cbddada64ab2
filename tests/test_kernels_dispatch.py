"""The torch side of kernels/: the CPU dispatch path and the references against a naive float32 loop."""
from __future__ import annotations

import pytest
import torch

from kernels import ExpertWeights, fused_moe, reference
from kernels.cpu_moe import fused_moe_cpu, matmul_weight
from kernels.routing import padded_capacity

# Legend: T = tokens, E = experts, L = local experts, D = hidden, F = ffn, R = scale row blocks.


def random_experts(num_experts: int, hidden: int, ffn: int, weight_dtype: torch.dtype = torch.float32,
                   rows13: int = 1, rows2: int = 8, seed: int = 0, transposed: bool = False) -> ExpertWeights:
    """transposed: weights stored [out, in] (nn.Linear's layout) and passed as [in, out] views."""
    gen = torch.Generator().manual_seed(seed)

    def stored(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous().transpose(1, 2) if transposed else t

    if weight_dtype == torch.int8:
        w13 = torch.randint(-127, 128, (num_experts, hidden, 2 * ffn), generator=gen, dtype=torch.int8)
        w2 = torch.randint(-127, 128, (num_experts, ffn, hidden), generator=gen, dtype=torch.int8)
        # Scales near 1 / (127 sqrt(K)) keep activations O(1), varied per row block and column.
        s13 = (0.5 + torch.rand(num_experts, rows13, 2 * ffn, generator=gen)) / (127 * hidden ** 0.5)
        s2 = (0.5 + torch.rand(num_experts, rows2, hidden, generator=gen)) / (127 * ffn ** 0.5)
        return ExpertWeights(stored(w13), stored(w2), s13.to(torch.bfloat16), s2.to(torch.bfloat16))
    w13 = torch.randn(num_experts, hidden, 2 * ffn, generator=gen) * hidden ** -0.5
    w2 = torch.randn(num_experts, ffn, hidden, generator=gen) * ffn ** -0.5
    return ExpertWeights(stored(w13.to(weight_dtype)), stored(w2.to(weight_dtype)))


def float_weights(experts: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 weights the int8 ones stand for: weight.float() * scale.float(), per row block."""
    w13 = reference.dequantize(experts.w13, experts.w13_scales, torch.float32)
    w2 = reference.dequantize(experts.w2, experts.w2_scales, torch.float32)
    return w13, w2


def naive_moe_fp32(x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertWeights, top_k: int,
                   expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token, exactly as the Grok-1 reference reads: float32 throughout."""
    w13, w2 = float_weights(experts)
    ffn = experts.ffn_size
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for t in range(x.shape[0]):
        probs = torch.softmax(router_logits[t], dim=-1)
        chosen = sorted(range(probs.numel()), key=lambda e: (-probs[e].item(), e))[:top_k]
        for e in chosen:
            local = e if expert_map is None else int(expert_map[e])
            if local < 0:
                continue
            xt = x[t].float()
            h = torch.nn.functional.gelu(xt @ w13[local, :, :ffn], approximate="tanh") * (xt @ w13[local, :, ffn:])
            out[t] += probs[e] * (h @ w2[local])
    return out


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.float().abs().max().clamp_min(1e-30)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * max |expected| {scale:.3e}"


@pytest.mark.parametrize("num_tokens", [1, 7, 40])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("transposed", [False, True])
def test_cpu_path_matches_naive_fp32(num_tokens, top_k, transposed):
    experts = random_experts(8, 48, 40, seed=num_tokens, transposed=transposed)
    gen = torch.Generator().manual_seed(100 + num_tokens)
    x = torch.randn(num_tokens, 48, generator=gen)
    logits = torch.randn(num_tokens, 8, generator=gen)
    out = fused_moe(x, logits, experts, top_k)
    assert out.dtype == torch.float32 and out.shape == (num_tokens, 48)
    assert_close_rel(out, naive_moe_fp32(x, logits, experts, top_k), 1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_cpu_path_half_weights_fp32_activations(weight_dtype, transposed):
    # Half weights widen exactly, so float32 activations keep the float32 contract.
    experts = random_experts(8, 64, 48, weight_dtype, seed=3, transposed=transposed)
    gen = torch.Generator().manual_seed(4)
    x, logits = torch.randn(9, 64, generator=gen), torch.randn(9, 8, generator=gen)
    assert_close_rel(fused_moe(x, logits, experts, 2), naive_moe_fp32(x, logits, experts, 2), 1e-5)


@pytest.mark.parametrize("rows13,rows2,transposed", [(1, 8, False), (8, 1, False), (1, 1, False), (1, 8, True)])
def test_cpu_path_int8_matches_dequantized_fp32(rows13, rows2, transposed):
    experts = random_experts(8, 64, 48, torch.int8, rows13, rows2, seed=5, transposed=transposed)
    gen = torch.Generator().manual_seed(6)
    x, logits = torch.randn(11, 64, generator=gen), torch.randn(11, 8, generator=gen)
    assert_close_rel(fused_moe(x, logits, experts, 2), naive_moe_fp32(x, logits, experts, 2), 1e-5)


@pytest.mark.parametrize("num_tokens", [1, 13, 80])  # per expert: one row, a few, many
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("transposed", [False, True])
def test_cpu_path_half_activations_match_reference(act_dtype, weight_dtype, num_tokens, transposed):
    experts = random_experts(8, 64, 48, weight_dtype, seed=7, transposed=transposed)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(num_tokens, 64, generator=gen).to(act_dtype)
    logits = torch.randn(num_tokens, 8, generator=gen)
    out = fused_moe(x, logits, experts, 2)
    assert out.dtype == act_dtype
    # Same numerics as the reference kernels (float32 accumulation, one rounding per stage).
    assert_close_rel(out, reference.fused_moe(x, logits, experts, 2), 1e-2)
    # And near the float32 model: bounded by the half-precision rounding of x, weights and h.
    assert_close_rel(out, naive_moe_fp32(x.float(), logits, experts, 2), 3e-2)


def test_expert_map_partial_sums_add_up_to_the_full_layer():
    experts = random_experts(8, 32, 24, seed=9)
    gen = torch.Generator().manual_seed(10)
    x, logits = torch.randn(17, 32, generator=gen), torch.randn(17, 8, generator=gen)
    full = fused_moe(x, logits, experts, 2)
    ranks = 4
    total = torch.zeros_like(full)
    for rank in range(ranks):
        held = [e for e in range(8) if e % ranks == rank]  # expert e lives on rank e mod N
        expert_map = torch.full((8,), -1, dtype=torch.int32)
        expert_map[held] = torch.arange(len(held), dtype=torch.int32)
        shard = ExpertWeights(experts.w13[held].contiguous(), experts.w2[held].contiguous())
        partial = fused_moe(x, logits, shard, 2, expert_map=expert_map)
        assert_close_rel(partial, naive_moe_fp32(x, logits, shard, 2, expert_map), 1e-5)
        total += partial
    assert_close_rel(total, full, 1e-5)


def test_expert_map_with_no_held_expert_routed_gives_zeros():
    experts = random_experts(2, 16, 16, seed=11)
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 6.0, 5.0, 0.0]])  # top-2: {0, 1} and {1, 2}
    expert_map = torch.tensor([-1, -1, -1, 0], dtype=torch.int32)
    counts = torch.zeros(4, dtype=torch.int64)
    out = fused_moe(torch.randn(2, 16), logits, experts, 2, expert_map=expert_map, expert_counts_out=counts)
    assert torch.equal(out, torch.zeros(2, 16))
    assert counts.tolist() == [1, 2, 1, 0]


def test_expert_counts_out_is_added_in_place():
    experts = random_experts(8, 16, 16, seed=12)
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(25, 8, generator=gen)
    counts = torch.arange(8, dtype=torch.int64)
    before = counts.clone()
    fused_moe(torch.randn(25, 16, generator=gen), logits, experts, 2, expert_counts_out=counts)
    _, ids = reference.softmax_topk(logits, 2)
    assert torch.equal(counts - before, torch.bincount(ids.flatten().long(), minlength=8))
    assert int((counts - before).sum()) == 50


def test_ties_go_to_the_lower_expert_id():
    # Equal logits make equal probabilities; jax.lax.top_k (the reference) picks lower ids first.
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 8, [2.0] + [3.0] * 7])
    weights, ids = reference.softmax_topk(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 1], [1, 2]]
    assert torch.equal(weights[:, 0], weights[:, 1])
    routing = reference.topk_gating(logits, 2, 16)
    assert routing.topk_ids.tolist() == ids.tolist()


def test_router_is_softmax_over_all_experts_not_renormalized():
    experts = random_experts(8, 16, 16, seed=14)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(15))
    out = fused_moe(x, logits, experts, 2)
    probs = torch.softmax(logits[0], -1)
    ffn = 16
    w13, w2 = experts.w13, experts.w2
    expected = sum(probs[e] * ((torch.nn.functional.gelu(x[0] @ w13[e, :, :ffn], approximate="tanh")
                                * (x[0] @ w13[e, :, ffn:])) @ w2[e]) for e in (0, 1))
    assert probs[0] + probs[1] < 0.95  # so renormalizing would show
    assert_close_rel(out[0], expected, 1e-5)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_reference_gating_layout(block_m):
    gen = torch.Generator().manual_seed(16)
    logits = torch.randn(29, 6, generator=gen)
    logits[:, 5] -= 100.0  # expert 5 receives nothing
    expert_map = torch.tensor([0, -1, 1, 2, -1, 3], dtype=torch.int32)
    routing = reference.topk_gating(logits, 2, block_m, num_local_experts=4, expert_map=expert_map)
    slots = routing.sorted_slot_ids.tolist()
    assert len(slots) == padded_capacity(58, 4, block_m) and len(slots) % block_m == 0
    local_of_slot = [int(expert_map[e]) for e in routing.topk_ids.flatten().tolist()]
    expected_counts = [local_of_slot.count(e) for e in range(4)]
    assert routing.expert_counts.tolist() == expected_counts
    assert expected_counts[3] == 0
    pos = 0
    for e, n in enumerate(expected_counts):
        run = -(-n // block_m) * block_m
        mine = [s for s in range(58) if local_of_slot[s] == e]
        assert slots[pos:pos + n] == mine  # the expert's slots, in slot order
        assert all(s == 58 for s in slots[pos + n:pos + run])  # then sentinels
        assert all(b == e for b in routing.block_expert_ids[pos // block_m:(pos + run) // block_m].tolist())
        pos += run
    assert int(routing.num_padded) == pos
    assert all(s == 58 for s in slots[pos:])
    assert all(b == -1 for b in routing.block_expert_ids[pos // block_m:].tolist())


def test_reference_kernels_chain_to_the_naive_layer():
    experts = random_experts(4, 40, 24, torch.int8, 1, 8, seed=17)
    gen = torch.Generator().manual_seed(18)
    x, logits = torch.randn(21, 40, generator=gen), torch.randn(21, 4, generator=gen)
    routing = reference.topk_gating(logits, 2, 16)
    h = reference.grouped_gemm_gate_up(x, experts.w13, experts.w13_scales, routing)
    assert h.shape == (42, 24)
    out = reference.grouped_gemm_down(h, experts.w2, experts.w2_scales, routing)
    assert_close_rel(out, naive_moe_fp32(x, logits, experts, 2), 1e-5)


@pytest.mark.parametrize("rows,blocks,tile_bytes", [
    (96, 8, 4 << 20),  # several scale row blocks per tile
    (4096, 2, 1 << 16),  # tiles inside one block (2048 rows a block, 128-row tiles)
    (1000, 8, 1 << 16),  # 125-row blocks: tiles of a divisor of 125
])
@pytest.mark.parametrize("transposed", [False, True])
def test_widening_tiles_respect_scale_row_blocks(rows, blocks, tile_bytes, transposed, monkeypatch):
    from kernels import cpu_moe

    monkeypatch.setattr(cpu_moe, "_TILE_BYTES", tile_bytes)
    monkeypatch.setattr(cpu_moe, "_TILE_COLS", 32)  # several column tiles too
    gen = torch.Generator().manual_seed(19)
    weight = torch.randint(-127, 128, (rows, 72), generator=gen, dtype=torch.int8)
    if transposed:
        weight = weight.t().contiguous().t()
    scales = torch.rand(blocks, 72, generator=gen).to(torch.bfloat16)
    a = torch.randn(3, rows, generator=gen)
    expected = a @ reference.dequantize(weight, scales, torch.float32)
    assert_close_rel(matmul_weight(a, weight, scales), expected, 1e-5)


def test_empty_batch():
    experts = random_experts(8, 16, 16)
    out = fused_moe(torch.empty(0, 16), torch.empty(0, 8), experts, 2)
    assert out.shape == (0, 16)
    assert reference.fused_moe(torch.empty(0, 16), torch.empty(0, 8), experts, 2).shape == (0, 16)


def test_triton_is_not_imported_on_cpu():
    import subprocess
    import sys

    code = ("import sys, torch, kernels; from kernels import ExpertWeights, fused_moe; "
            "e = ExpertWeights(torch.zeros(8, 4, 8), torch.zeros(8, 4, 4)); "
            "fused_moe(torch.zeros(1, 4), torch.zeros(1, 8), e, 2); print('triton' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("kwargs,message", [
    ({"w13": torch.zeros(2, 4, 7)}, "even"),
    ({"w2": torch.zeros(2, 4, 4)}, "must be \\[2, 3, 4\\]"),
    ({"w13": torch.zeros(2, 4, 6, dtype=torch.int8)}, "needs w13_scales"),
    ({"w13_scales": torch.zeros(2, 1, 6)}, "not int8"),
    ({"w13": torch.zeros(2, 4, 6, dtype=torch.int8), "w13_scales": torch.zeros(2, 3, 6)}, "do not divide"),
    ({"w13": torch.zeros(2, 4, 6, dtype=torch.int8), "w13_scales": torch.zeros(2, 1, 5)}, "must be \\[2, R, 6\\]"),
    ({"w13": torch.zeros(2, 4, 6, dtype=torch.int8), "w13_scales": torch.zeros(2, 1, 6, dtype=torch.int8)},
     "floating point"),
    ({"w2": torch.zeros(2, 3, 4, dtype=torch.int32)}, "dtype"),
])
def test_expert_weights_validation(kwargs, message):
    base = {"w13": torch.zeros(2, 4, 6), "w2": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match=message):
        ExpertWeights(**{**base, **kwargs})


@pytest.mark.parametrize("change,message", [
    ({"router_logits": torch.zeros(3, 8, dtype=torch.float16)}, "float32"),
    ({"router_logits": torch.zeros(2, 8)}, "router_logits must be \\[3"),
    ({"top_k": 9}, "top_k"),
    ({"x": torch.zeros(3, 5)}, "hidden size"),
    ({"x": torch.zeros(3, 4, dtype=torch.int32)}, "x must be"),
    ({"expert_map": torch.zeros(8, dtype=torch.int64)}, "expert_map must be int32"),
    ({"expert_counts_out": torch.zeros(8, dtype=torch.int32)}, "int64"),
    ({"router_logits": torch.zeros(3, 4)}, "no expert_map"),
])
def test_fused_moe_rejects_bad_arguments(change, message):
    args = {"x": torch.zeros(3, 4), "router_logits": torch.zeros(3, 8),
            "experts": ExpertWeights(torch.zeros(8, 4, 6), torch.zeros(8, 3, 4)), "top_k": 2,
            "expert_map": None, "expert_counts_out": None}
    args.update(change)
    for impl in (fused_moe, fused_moe_cpu, reference.fused_moe):
        with pytest.raises(ValueError, match=message):
            impl(**args)


def test_unknown_moe_backend_is_refused():
    experts = ExpertWeights(torch.zeros(8, 4, 6), torch.zeros(8, 3, 4))
    with pytest.raises(ValueError, match="MoE backend must be one of"):
        fused_moe(torch.zeros(1, 4), torch.zeros(1, 8), experts, 2, backend="cuda")


def test_triton_backend_on_cpu_tensors_needs_the_interpreter():
    pytest.importorskip("triton")
    experts = ExpertWeights(torch.zeros(8, 4, 6), torch.zeros(8, 3, 4))
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fused_moe(torch.zeros(1, 4), torch.zeros(1, 8), experts, 2, backend="triton")
