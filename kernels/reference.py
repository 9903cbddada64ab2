"""Torch reference implementations of the MoE kernels, with the Triton kernels' signatures.

Written for clarity, not speed: they define the numerics the kernels are tested against.
- Compute dtype c = the activations' dtype; products accumulate in float32. A float weight is
  rounded to c. An int8 weight is dequantized in float32 (`weight.float() * scale.float()`, exact:
  7 bits times bfloat16's 8 make 15 of float32's 24) and not rounded: the Triton kernels feed the
  int8 values (exact in c) to the tensor cores and scale the float32 partial sums, which is the same
  sum in a different order (W8A16, kernels/triton_tiles.py).
- GEMM 1's epilogue gelu_tanh(a) * b runs in float32 and rounds once to c.
- GEMM 2 scales each slot's row by its routing weight in float32 and sums the slots of a token in
  float32 before rounding once to c.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .expert_weights import ExpertWeights
from .moe_inputs import check_gating_inputs, check_moe_inputs
from .routing import Routing, padded_capacity

# Legend: T = tokens, K = top_k, S = T * K slots, E = experts (global), L = local experts, D = hidden,
# F = ffn, N = a GEMM's output columns, R = scale row blocks, P = padded capacity, B = P // block_m.


def gelu_tanh(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a, approximate="tanh")


def softmax_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference router: float32 softmax over all experts, top_k probabilities, not renormalized.
    Ties go to the lower expert id as in jax.lax.top_k; torch.topk on CPU does not promise that, a
    stable descending sort does."""
    probs = torch.softmax(router_logits, dim=-1)  # [T, E]
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    return order.values[:, :top_k].contiguous(), order.indices[:, :top_k].to(torch.int32).contiguous()


def dequantize(weight: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """weight [..., K, N] (int8 with scales [..., R, N], or floating) -> the float32 weight the GEMMs
    multiply by: a float weight rounded to dtype first, an int8 one exact (never rounded)."""
    if scales is None:
        return weight.to(dtype).float()
    rows_per_block = weight.shape[-2] // scales.shape[-2]
    return weight.float() * scales.float().repeat_interleave(rows_per_block, dim=-2)


def topk_gating(router_logits: torch.Tensor, top_k: int, block_m: int, num_local_experts: int | None = None,
                expert_map: torch.Tensor | None = None,
                expert_counts_out: torch.Tensor | None = None) -> Routing:
    """router_logits float32 [T, E] -> Routing. expert_map int32 [E]: global id -> local id or -1.
    expert_counts_out int64 [E]: routes per global expert are added into it."""
    num_local = check_gating_inputs(router_logits, top_k, num_local_experts, expert_map, expert_counts_out)
    device = router_logits.device
    weights, ids = softmax_topk(router_logits, top_k)  # [T, K], [T, K]
    num_slots = ids.numel()
    if expert_counts_out is not None:
        expert_counts_out += torch.bincount(ids.flatten().long(), minlength=router_logits.shape[1])
    local = ids.flatten().long() if expert_map is None else expert_map.long()[ids.flatten().long()]  # [S]
    local = torch.where(local >= 0, local, num_local)  # unrouted slots sort last
    counts = torch.bincount(local, minlength=num_local + 1)[:num_local]  # [L]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)  # [L]
    padded_starts = padded_ends - padded
    starts = torch.cumsum(counts, 0) - counts

    order = torch.sort(local, stable=True).indices  # [S] slots by expert, slot order within one
    sorted_local = local[order]
    routed = sorted_local < num_local
    expert = sorted_local[routed]
    rank = torch.arange(num_slots, device=device)[routed] - starts[expert]
    capacity = padded_capacity(num_slots, num_local, block_m)
    sorted_slot_ids = torch.full((capacity,), num_slots, dtype=torch.int32, device=device)
    sorted_slot_ids[padded_starts[expert] + rank] = order[routed].to(torch.int32)

    block_starts = torch.arange(0, capacity, block_m, device=device)  # [B]
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1)
    return Routing(
        topk_weights=weights, topk_ids=ids, sorted_slot_ids=sorted_slot_ids,
        block_expert_ids=block_expert.to(torch.int32),
        num_padded=padded.sum().reshape(1).to(torch.int32),
        expert_counts=counts.to(torch.int32), block_m=block_m,
    )


def _expert_slots(routing: Routing) -> list[torch.Tensor]:
    """The slots of each local expert, read back from the padded layout."""
    positions = torch.arange(routing.sorted_slot_ids.shape[0], device=routing.sorted_slot_ids.device)
    position_expert = routing.block_expert_ids.long()[positions // routing.block_m]  # [P]
    real = routing.sorted_slot_ids < routing.num_slots
    return [routing.sorted_slot_ids[real & (position_expert == e)].long()
            for e in range(routing.num_local_experts)]


def grouped_gemm_gate_up(x: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor | None,
                         routing: Routing) -> torch.Tensor:
    """x [T, D], w13 [L, D, 2F] (+ scales [L, R, 2F]) -> h [S, F] in x.dtype, row s for slot s:
    gelu_tanh(x[t] @ linear) * (x[t] @ linear_v). Rows of slots no local expert takes are unspecified."""
    ffn = w13.shape[2] // 2
    h = torch.zeros(routing.num_slots, ffn, dtype=x.dtype, device=x.device)  # [S, F]
    for e, slots in enumerate(_expert_slots(routing)):
        if slots.numel() == 0:
            continue
        weight = dequantize(w13[e], None if w13_scales is None else w13_scales[e], x.dtype)
        ab = x[slots // routing.top_k].float() @ weight  # [n, 2F]
        h[slots] = (gelu_tanh(ab[:, :ffn]) * ab[:, ffn:]).to(x.dtype)
    return h


def grouped_gemm_down(h: torch.Tensor, w2: torch.Tensor, w2_scales: torch.Tensor | None,
                      routing: Routing) -> torch.Tensor:
    """h [S, F], w2 [L, F, D] (+ scales [L, R, D]) -> [T, D] in h.dtype: per token, the sum over its
    locally held slots of routing weight * (h[s] @ linear_1)."""
    out = torch.zeros(routing.num_tokens, w2.shape[2], dtype=torch.float32, device=h.device)  # [T, D]
    gates = routing.topk_weights.flatten()  # [S]
    for e, slots in enumerate(_expert_slots(routing)):
        if slots.numel() == 0:
            continue
        weight = dequantize(w2[e], None if w2_scales is None else w2_scales[e], h.dtype)
        y = (h[slots].float() @ weight) * gates[slots, None]  # [n, D]
        out.index_add_(0, slots // routing.top_k, y)
    return out.to(h.dtype)


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertWeights, top_k: int,
              expert_map: torch.Tensor | None = None, expert_counts_out: torch.Tensor | None = None,
              block_m: int = 16) -> torch.Tensor:
    """The three reference kernels chained as the Triton path chains them."""
    check_moe_inputs(x, router_logits, experts, top_k, expert_map, expert_counts_out)
    routing = topk_gating(router_logits, top_k, block_m,
                          experts.num_experts if expert_map is not None else None,
                          expert_map, expert_counts_out)
    h = grouped_gemm_gate_up(x, experts.w13, experts.w13_scales, routing)
    return grouped_gemm_down(h, experts.w2, experts.w2_scales, routing)
