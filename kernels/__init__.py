"""MoE kernels for Grok-1: top-k gating and grouped expert GEMMs (Triton), their torch references,
and the dispatch the model calls. Triton is imported only when a CUDA tensor needs it."""
from .dispatch import ExpertWeights, fused_moe
from .reference import gelu_tanh, softmax_topk
from .routing import Routing, padded_capacity
from .tile_config import GemmTiles, MoeTileConfig, select_tile_config

__all__ = [
    "ExpertWeights", "GemmTiles", "MoeTileConfig", "Routing", "fused_moe", "gelu_tanh", "padded_capacity",
    "select_tile_config", "softmax_topk",
]
