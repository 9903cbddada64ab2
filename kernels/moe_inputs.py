"""Argument checks shared by every implementation of the MoE kernels, so they fail alike."""
from __future__ import annotations

import torch

from .expert_weights import ExpertWeights

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_gating_inputs(router_logits: torch.Tensor, top_k: int, num_local_experts: int | None,
                        expert_map: torch.Tensor | None, expert_counts_out: torch.Tensor | None) -> int:
    """Returns the number of local experts."""
    if router_logits.dim() != 2 or router_logits.dtype != torch.float32:
        raise ValueError(f"router_logits must be float32 [tokens, experts], got {router_logits.dtype} "
                         f"{list(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}], got {top_k!r}")
    if expert_map is not None:
        if expert_map.shape != (num_experts,) or expert_map.dtype != torch.int32:
            raise ValueError(f"expert_map must be int32 [{num_experts}], got {expert_map.dtype} "
                             f"{list(expert_map.shape)}")
        if expert_map.device != router_logits.device:
            raise ValueError(f"expert_map is on {expert_map.device}, router_logits on {router_logits.device}")
        if num_local_experts is None:
            # Deriving it from the map would read the map on the host.
            raise ValueError("num_local_experts is required with an expert_map")
    elif num_local_experts is not None and num_local_experts != num_experts:
        raise ValueError(f"without an expert_map all {num_experts} experts are local, "
                         f"got num_local_experts={num_local_experts}")
    if expert_counts_out is not None:
        if expert_counts_out.shape != (num_experts,) or expert_counts_out.dtype != torch.int64:
            raise ValueError(f"expert_counts_out must be int64 [{num_experts}], got "
                             f"{expert_counts_out.dtype} {list(expert_counts_out.shape)}")
        if expert_counts_out.device != router_logits.device:
            raise ValueError(f"expert_counts_out is on {expert_counts_out.device}, "
                             f"router_logits on {router_logits.device}")
    return num_experts if num_local_experts is None else num_local_experts


def check_moe_inputs(x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertWeights, top_k: int,
                     expert_map: torch.Tensor | None, expert_counts_out: torch.Tensor | None) -> None:
    if not isinstance(experts, ExpertWeights):
        raise TypeError(f"experts must be ExpertWeights, got {type(experts).__name__}")
    if x.dim() != 2 or x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x must be [tokens, hidden] in one of {[str(d) for d in ACTIVATION_DTYPES]}, "
                         f"got {x.dtype} {list(x.shape)}")
    if x.shape[1] != experts.hidden_size:
        raise ValueError(f"x hidden size {x.shape[1]} != expert hidden size {experts.hidden_size}")
    if router_logits.dim() != 2 or router_logits.shape[0] != x.shape[0]:
        raise ValueError(f"router_logits must be [{x.shape[0]}, experts], got {list(router_logits.shape)}")
    if x.device != experts.device or router_logits.device != x.device:
        raise ValueError(f"x ({x.device}), router_logits ({router_logits.device}) and expert weights "
                         f"({experts.device}) must be on one device")
    num_experts = router_logits.shape[1]
    if expert_map is None and experts.num_experts != num_experts:
        raise ValueError(f"{num_experts} experts in router_logits but {experts.num_experts} expert weights "
                         "held and no expert_map")
    check_gating_inputs(router_logits, top_k, experts.num_experts if expert_map is not None else None,
                        expert_map, expert_counts_out)
