"""The Triton kernels, run on CPU by triton's interpreter, against the torch references.

The checks run in a child pytest (tests/interpreter.py). Shapes stay tiny because the interpreter
runs programs one by one.
"""
from __future__ import annotations

import pytest
import torch

from kernels.tile_config import interpreter_tile_config
from tests.interpreter import IN_INTERPRETER, run_file_under_interpreter
from tests.test_kernels_dispatch import assert_close_rel, naive_moe_fp32, random_experts

# Legend: T = tokens, E = experts, L = local experts, D = hidden, F = ffn.


def routing_fields_equal(a, b) -> None:
    for name in ("topk_ids", "sorted_slot_ids", "block_expert_ids", "num_padded", "expert_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.topk_weights, b.topk_weights, rtol=1e-6, atol=1e-7)


def run_both(x, logits, experts, top_k, config, expert_map=None):
    from kernels import reference
    from kernels.triton_moe import fused_moe_triton

    counts_triton = torch.zeros(logits.shape[1], dtype=torch.int64)
    counts_reference = torch.zeros(logits.shape[1], dtype=torch.int64)
    out = fused_moe_triton(x, logits, experts, top_k, expert_map, counts_triton, config=config)
    expected = reference.fused_moe(x, logits, experts, top_k, expert_map, counts_reference,
                                   block_m=config.block_m)
    assert torch.equal(counts_triton, counts_reference)
    return out, expected


class _InterpreterChecks:
    @pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m,local", [
        (1, 8, 2, 16, None), (37, 8, 2, 16, None), (70, 6, 3, 16, 3), (5, 8, 2, 16, 2), (0, 8, 2, 16, None),
        (600, 8, 2, 32, None),  # several trips through every pass
    ])
    def test_gating_matches_reference(self, num_tokens, num_experts, top_k, block_m, local):
        from kernels import reference, triton_gating

        gen = torch.Generator().manual_seed(num_tokens)
        logits = torch.randn(num_tokens, num_experts, generator=gen)
        expert_map = None
        if local is not None:
            expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
            expert_map[torch.randperm(num_experts, generator=gen)[:local]] = torch.arange(local, dtype=torch.int32)
        counts = [torch.full((num_experts,), 3, dtype=torch.int64) for _ in range(2)]
        got = triton_gating.topk_gating(logits, top_k, block_m, local, expert_map, counts[0])
        want = reference.topk_gating(logits, top_k, block_m, local, expert_map, counts[1])
        routing_fields_equal(got, want)
        assert torch.equal(counts[0], counts[1])

    def test_gating_ties_and_a_single_expert(self):
        from kernels import reference, triton_gating

        logits = torch.zeros(20, 8)
        logits[:, 3] = 5.0  # every token: expert 3, then the tie among the rest goes to expert 0
        got = triton_gating.topk_gating(logits, 2, 16)
        routing_fields_equal(got, reference.topk_gating(logits, 2, 16))
        assert got.expert_counts.tolist() == [20, 0, 0, 20, 0, 0, 0, 0]

    @pytest.mark.parametrize("act_dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("weight_dtype,rows13,rows2", [
        (torch.float32, 1, 1), (torch.bfloat16, 1, 1), (torch.int8, 1, 8), (torch.int8, 8, 1),
    ])
    def test_grouped_gemms_match_reference(self, act_dtype, weight_dtype, rows13, rows2):
        from kernels import reference
        from kernels.triton_down import grouped_gemm_down
        from kernels.triton_gate_up import grouped_gemm_gate_up

        experts = random_experts(4, 64, 32, weight_dtype, rows13, rows2, seed=1)
        gen = torch.Generator().manual_seed(2)
        x, logits = torch.randn(19, 64, generator=gen).to(act_dtype), torch.randn(19, 4, generator=gen)
        config = interpreter_tile_config(64, 32)
        routing = reference.topk_gating(logits, 2, config.block_m)
        h = grouped_gemm_gate_up(x, experts.w13, experts.w13_scales, routing, config.gate_up)
        h_ref = reference.grouped_gemm_gate_up(x, experts.w13, experts.w13_scales, routing)
        assert h.dtype == act_dtype
        rel = 1e-5 if act_dtype == torch.float32 else 2e-3
        assert_close_rel(h, h_ref, rel)
        # GEMM 2 on the same h, so only its own error shows.
        out = grouped_gemm_down(h_ref, experts.w2, experts.w2_scales, routing, config.down)
        assert out.dtype == act_dtype
        assert_close_rel(out, reference.grouped_gemm_down(h_ref, experts.w2, experts.w2_scales, routing), rel)

    @pytest.mark.parametrize("weight_dtype,act_dtype", [(torch.int8, torch.float32), (torch.bfloat16, torch.float16)])
    def test_weights_stored_out_in(self, weight_dtype, act_dtype):
        # [in, out] views of [out, in] storage (nn.Linear's layout): the kernels follow the strides.
        experts = random_experts(4, 32, 16, weight_dtype, 1, 8, seed=9, transposed=True)
        gen = torch.Generator().manual_seed(10)
        x, logits = torch.randn(7, 32, generator=gen).to(act_dtype), torch.randn(7, 4, generator=gen)
        out, expected = run_both(x, logits, experts, 2, interpreter_tile_config(32, 16))
        assert_close_rel(out, expected, 1e-5 if act_dtype == torch.float32 else 2e-3)

    @pytest.mark.parametrize("case", ["one_token", "ragged", "idle_expert", "one_expert", "ragged_k"])
    def test_fused_layer_edge_shapes(self, case):
        num_tokens, hidden, ffn = {"one_token": (1, 32, 16), "ragged": (21, 32, 16), "idle_expert": (9, 32, 16),
                                   "one_expert": (18, 32, 16), "ragged_k": (5, 40, 24)}[case]
        experts = random_experts(4, hidden, ffn, torch.int8, 1, 8, seed=3)
        gen = torch.Generator().manual_seed(4)
        x, logits = torch.randn(num_tokens, hidden, generator=gen), torch.randn(num_tokens, 4, generator=gen)
        config = interpreter_tile_config(hidden, ffn)
        if case == "idle_expert":
            logits[:, 2] = -30.0
        if case == "one_expert":
            logits = torch.zeros(num_tokens, 4)
            logits[:, 1] = 9.0
        if case == "ragged_k":
            from kernels.tile_config import GemmTiles, MoeTileConfig

            # K of both GEMMs (40, 24) not a multiple of BLOCK_K (16); linear_1's scale row blocks (3 rows)
            # split tiles, so its scales are gathered per row.
            config = MoeTileConfig(16, GemmTiles(block_n=16, block_k=16), GemmTiles(block_n=32, block_k=16))
        out, expected = run_both(x, logits, experts, 2, config)
        assert_close_rel(out, expected, 1e-5)
        assert_close_rel(out, naive_moe_fp32(x, logits, experts, 2), 1e-5)

    def test_expert_map_with_absent_experts(self):
        experts = random_experts(3, 32, 16, torch.bfloat16, seed=5)
        expert_map = torch.tensor([-1, 0, -1, -1, 1, -1, 2, -1], dtype=torch.int32)
        gen = torch.Generator().manual_seed(6)
        x, logits = torch.randn(13, 32, generator=gen).half(), torch.randn(13, 8, generator=gen)
        out, expected = run_both(x, logits, experts, 2, interpreter_tile_config(32, 16), expert_map)
        assert out.dtype == torch.float16
        assert_close_rel(out, expected, 2e-3)
        assert_close_rel(out, naive_moe_fp32(x.float(), logits, experts, 2, expert_map), 2e-2)

    def test_split_k_and_grouped_order(self):
        from kernels.tile_config import GemmTiles, MoeTileConfig

        # Two scale row blocks of 32 rows: every 16-row tile of linear_1 reads one row of scales.
        experts = random_experts(4, 32, 64, torch.int8, 1, 2, seed=7)
        gen = torch.Generator().manual_seed(8)
        x, logits = torch.randn(40, 32, generator=gen), torch.randn(40, 4, generator=gen)
        config = MoeTileConfig(16, GemmTiles(block_n=64, block_k=32, group_m=4),
                               GemmTiles(block_n=32, block_k=16, group_m=2, split_k=2))
        out, expected = run_both(x, logits, experts, 2, config)
        assert_close_rel(out, expected, 1e-5)

    def test_bfloat16_activations_are_refused_clearly(self):
        from kernels import reference
        from kernels.triton_gate_up import grouped_gemm_gate_up

        experts = random_experts(2, 16, 16, torch.bfloat16)
        routing = reference.topk_gating(torch.randn(2, 2), 1, 16)
        with pytest.raises(ValueError, match="interpreter cannot run bfloat16"):
            grouped_gemm_gate_up(torch.randn(2, 16).bfloat16(), experts.w13, None, routing)

    def test_random_small_shapes(self):
        from hypothesis import given, settings
        from hypothesis import strategies as st

        @settings(max_examples=6, deadline=None, derandomize=True, database=None)
        @given(num_tokens=st.integers(1, 24), num_experts=st.sampled_from([2, 4, 8]),
               hidden=st.sampled_from([16, 24, 48]), ffn=st.sampled_from([16, 40]),
               weight=st.sampled_from(["fp32", "bf16", "int8"]), act=st.sampled_from(["fp32", "fp16"]),
               with_map=st.booleans(), seed=st.integers(0, 2 ** 16))
        def check(num_tokens, num_experts, hidden, ffn, weight, act, with_map, seed):
            weight_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[weight]
            act_dtype = {"fp32": torch.float32, "fp16": torch.float16}[act]
            gen = torch.Generator().manual_seed(seed)
            top_k = min(2, num_experts)
            expert_map, num_local = None, num_experts
            if with_map:
                num_local = max(1, num_experts // 2)
                expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
                held = torch.randperm(num_experts, generator=gen)[:num_local]
                expert_map[held] = torch.arange(num_local, dtype=torch.int32)
            rows2 = 8 if ffn % 8 == 0 else 1
            experts = random_experts(num_local, hidden, ffn, weight_dtype, 1, rows2, seed=seed)
            x = torch.randn(num_tokens, hidden, generator=gen).to(act_dtype)
            logits = torch.randn(num_tokens, num_experts, generator=gen)
            out, expected = run_both(x, logits, experts, top_k, interpreter_tile_config(hidden, ffn), expert_map)
            assert_close_rel(out, expected, 1e-5 if act_dtype == torch.float32 else 2e-3)

        check()


if IN_INTERPRETER:
    TestInterpreter = _InterpreterChecks
else:
    def test_triton_kernels_under_the_interpreter():
        run_file_under_interpreter(__file__)
