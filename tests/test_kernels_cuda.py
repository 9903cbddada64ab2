"""The Triton kernels compiled and run on a CUDA GPU (not the interpreter), against the torch references.

Skipped without a GPU; scripts/gpu_check.sh runs them on a GPU host. bfloat16 activations are what
the interpreter cannot run: here they are the main case.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_kernels_dispatch import assert_close_rel, random_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Legend: T = tokens, E = experts, L = local experts, D = hidden, F = ffn.

# bfloat16 rounds h (GEMM 1's output) and the result once each: 8 bits of mantissa.
REL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _cuda(experts):
    from kernels.expert_weights import ExpertWeights

    def move(t):
        return None if t is None else t.cuda()

    return ExpertWeights(move(experts.w13), move(experts.w2), move(experts.w13_scales), move(experts.w2_scales))


@pytest.mark.parametrize("num_tokens,local", [(1, None), (300, None), (5000, None), (64, 2)])
def test_gating_matches_reference(num_tokens, local):
    from kernels import reference, triton_gating

    gen = torch.Generator().manual_seed(num_tokens)
    logits = torch.randn(num_tokens, 8, generator=gen).cuda()
    expert_map = None
    if local is not None:
        expert_map = torch.tensor([0, -1, -1, -1, 1, -1, -1, -1], dtype=torch.int32, device="cuda")
    got = triton_gating.topk_gating(logits, 2, 16, local, expert_map)
    want = reference.topk_gating(logits, 2, 16, local, expert_map)
    for name in ("topk_ids", "sorted_slot_ids", "block_expert_ids", "num_padded", "expert_counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weight_dtype,rows13,rows2", [
    (torch.int8, 1, 8), (torch.int8, 8, 1), (torch.bfloat16, 1, 1), (torch.float32, 1, 1),
])
@pytest.mark.parametrize("num_tokens", [1, 37, 700])
def test_fused_layer_matches_reference(act_dtype, weight_dtype, rows13, rows2, num_tokens):
    from kernels import reference
    from kernels.triton_moe import fused_moe_triton

    if weight_dtype == torch.float32 and act_dtype != torch.float32:
        pytest.skip("float32 weights are served with float32 activations")
    experts = _cuda(random_experts(8, 512, 1024, weight_dtype, rows13, rows2, seed=num_tokens))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, 512, generator=gen).to("cuda", act_dtype)
    logits = torch.randn(num_tokens, 8, generator=gen).cuda()
    out = fused_moe_triton(x, logits, experts, 2)
    assert out.dtype == act_dtype
    expected = reference.fused_moe(x, logits, experts, 2)
    assert_close_rel(out, expected, REL[act_dtype])


@pytest.mark.parametrize("weight_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 16, 256])
def test_grok1_ep8_shape_with_its_tile_configs(weight_dtype, num_tokens):
    """One rank of Grok-1 at EP 8: one expert of the real dims, the configs the dispatch picks."""
    from kernels import reference
    from kernels.triton_moe import fused_moe_triton

    hidden, ffn = 6144, 32768
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": gen}
    from kernels.expert_weights import ExpertWeights

    if weight_dtype == torch.int8:
        experts = ExpertWeights(
            torch.randint(-127, 128, (1, hidden, 2 * ffn), dtype=torch.int8, **kw),
            torch.randint(-127, 128, (1, ffn, hidden), dtype=torch.int8, **kw),
            ((0.5 + torch.rand(1, 1, 2 * ffn, **kw)) / (127 * hidden ** 0.5)).to(torch.bfloat16),
            ((0.5 + torch.rand(1, 8, hidden, **kw)) / (127 * ffn ** 0.5)).to(torch.bfloat16))
    else:
        experts = ExpertWeights((torch.randn(1, hidden, 2 * ffn, **kw) * hidden ** -0.5).bfloat16(),
                                (torch.randn(1, ffn, hidden, **kw) * ffn ** -0.5).bfloat16())
    x = torch.randn(num_tokens, hidden, **kw).bfloat16()
    logits = torch.randn(num_tokens, 8, **kw)
    logits[:, 0] += 8.0  # every token routed to this rank's expert
    expert_map = torch.tensor([0, -1, -1, -1, -1, -1, -1, -1], dtype=torch.int32, device="cuda")
    out = fused_moe_triton(x, logits, experts, 2, expert_map)
    expected = reference.fused_moe(x, logits, experts, 2, expert_map)
    assert_close_rel(out, expected, REL[torch.bfloat16])


def test_split_k_and_dispatch_pick_triton_on_cuda():
    from kernels import reference
    from kernels.dispatch import fused_moe
    from kernels.tile_config import GemmTiles, MoeTileConfig
    from kernels.triton_moe import fused_moe_triton

    experts = _cuda(random_experts(4, 256, 512, torch.int8, 1, 8, seed=3))
    x = torch.randn(9, 256, device="cuda").bfloat16()
    logits = torch.randn(9, 4, device="cuda")
    config = MoeTileConfig(16, GemmTiles(64, 64), GemmTiles(64, 64, split_k=4))
    expected = reference.fused_moe(x, logits, experts, 2)
    assert_close_rel(fused_moe_triton(x, logits, experts, 2, config=config), expected, REL[torch.bfloat16])
    assert_close_rel(fused_moe(x, logits, experts, 2), expected, REL[torch.bfloat16])
