"""The routing of one MoE call: what the gating kernel produces and the grouped GEMMs consume.

A slot is one (token, choice) pair, slot = token * top_k + choice. The grouped GEMMs walk the slots
sorted by local expert, each expert's run padded to a multiple of block_m so that every block of
block_m sorted positions belongs to one expert. Padding positions hold the sentinel num_slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Legend: T = tokens, K = top_k, E = local experts, P = padded capacity, B = P // block_m.


def padded_capacity(num_slots: int, num_local_experts: int, block_m: int) -> int:
    """An upper bound on the padded total that needs no look at the data (no host sync): each expert
    that receives a slot adds at most block_m - 1 padding, and at most num_slots experts receive one."""
    padding = min(num_local_experts, num_slots) * (block_m - 1)
    return -(-(num_slots + padding) // block_m) * block_m


@dataclass(frozen=True)
class Routing:
    topk_weights: torch.Tensor  # [T, K] float32 softmax probabilities, not renormalized
    topk_ids: torch.Tensor  # [T, K] int32 global expert ids, best first, ties to the lower id
    sorted_slot_ids: torch.Tensor  # [P] int32 slots grouped by local expert, sentinel T*K as padding
    block_expert_ids: torch.Tensor  # [B] int32 local expert of each block, -1 past the padded total
    num_padded: torch.Tensor  # [1] int32 padded total (blocks at or past it do no work)
    expert_counts: torch.Tensor  # [E] int32 slots routed to each local expert
    block_m: int

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_slots(self) -> int:
        return self.topk_ids.numel()

    @property
    def num_local_experts(self) -> int:
        return self.expert_counts.shape[0]
