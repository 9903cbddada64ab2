"""The Triton MoE layer: gating, GEMM 1 and GEMM 2 chained, with the tile config of the shape."""
from __future__ import annotations

import torch

from .expert_weights import ExpertWeights
from .moe_inputs import check_moe_inputs
from .tile_config import MoeTileConfig, interpreter_tile_config, select_tile_config
from .triton_down import grouped_gemm_down
from .triton_gate_up import grouped_gemm_gate_up
from .triton_gating import topk_gating


def fused_moe_triton(x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertWeights, top_k: int,
                     expert_map: torch.Tensor | None = None, expert_counts_out: torch.Tensor | None = None,
                     config: MoeTileConfig | None = None) -> torch.Tensor:
    """Three launches and no host sync: every size on the host side is a worst-case bound."""
    check_moe_inputs(x, router_logits, experts, top_k, expert_map, expert_counts_out)
    if config is None and not x.is_cuda:
        # CPU tensors reach here only under triton's interpreter (the launchers check).
        config = interpreter_tile_config(experts.hidden_size, experts.ffn_size)
    elif config is None:
        device_name = torch.cuda.get_device_name(x.device) if x.is_cuda else None
        config = select_tile_config(x.shape[0], experts.num_experts, experts.hidden_size, experts.ffn_size,
                                    experts.weight_dtype, device_name)
    routing = topk_gating(router_logits, top_k, config.block_m,
                          experts.num_experts if expert_map is not None else None, expert_map, expert_counts_out)
    h = grouped_gemm_gate_up(x, experts.w13, experts.w13_scales, routing, config.gate_up)
    return grouped_gemm_down(h, experts.w2, experts.w2_scales, routing, config.down)
