"""The peer the benchmark measures against: Hugging Face Mixtral's sparse MoE block as it is written
there (a loop over all experts, torch.where on the routing mask, index_add_), with its own weight
layout (nn.Linear, [out, in]) and Grok-1's router (softmax over all experts, top-k, no renormalization).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .expert_weights import ExpertWeights
from .reference import dequantize

# Legend: T = tokens, K = top_k, E = experts (global), D = hidden, F = ffn.


@dataclass(frozen=True)
class LinearExperts:
    """Per local expert, the three nn.Linear weights of a Mixtral expert: w1 = linear, w3 = linear_v
    (both [F, D]) and w2 = linear_1 ([D, F])."""

    w1: tuple[torch.Tensor, ...]
    w3: tuple[torch.Tensor, ...]
    w2: tuple[torch.Tensor, ...]

    @classmethod
    def from_expert_weights(cls, experts: ExpertWeights) -> LinearExperts:
        ffn = experts.ffn_size
        dtype = torch.bfloat16 if experts.weight_dtype == torch.int8 else experts.weight_dtype
        w1, w3, w2 = [], [], []
        for e in range(experts.num_experts):
            w13 = dequantize(experts.w13[e], None if experts.w13_scales is None else experts.w13_scales[e], dtype).to(dtype)
            w1.append(w13[:, :ffn].t().contiguous())
            w3.append(w13[:, ffn:].t().contiguous())
            down = dequantize(experts.w2[e], None if experts.w2_scales is None else experts.w2_scales[e],
                              dtype).to(dtype)
            w2.append(down.t().contiguous())
        return cls(tuple(w1), tuple(w3), tuple(w2))


def naive_moe(x: torch.Tensor, router_logits: torch.Tensor, experts: LinearExperts, top_k: int,
              local_of_global: list[int] | None = None) -> torch.Tensor:
    """x [T, D], router_logits float32 [T, E] -> [T, D]. local_of_global: global id -> local index or -1."""
    num_tokens, hidden = x.shape
    num_experts = router_logits.shape[1]
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)  # [T, E]
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)  # [T, K]
    routing_weights = routing_weights.to(x.dtype)
    final_hidden_states = torch.zeros(num_tokens, hidden, dtype=x.dtype, device=x.device)
    expert_mask = F.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)  # [E, K, T]
    for expert_idx in range(num_experts):
        local = expert_idx if local_of_global is None else local_of_global[expert_idx]
        if local < 0:
            continue
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = x[None, top_x].reshape(-1, hidden)
        gated = F.gelu(F.linear(current_state, experts.w1[local]), approximate="tanh")
        current = F.linear(gated * F.linear(current_state, experts.w3[local]), experts.w2[local])
        current = current * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current.to(x.dtype))
    return final_hidden_states
