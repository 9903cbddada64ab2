"""MoE kernels for Grok-1: top-k gating and grouped expert GEMMs (Triton), their torch references
(kernels.reference, same signatures), and the dispatch the model calls.

triton is imported only when a Triton piece is first used, so CPU-only processes never load it.
"""
from . import reference
from .dispatch import ExpertWeights, fused_moe
from .reference import gelu_tanh, softmax_topk
from .routing import Routing, padded_capacity
from .tile_config import GemmTiles, MoeTileConfig, select_tile_config

_TRITON_PIECES = {
    "topk_gating": "triton_gating",
    "grouped_gemm_gate_up": "triton_gate_up",
    "grouped_gemm_down": "triton_down",
    "fused_moe_triton": "triton_moe",
}

__all__ = [
    "ExpertWeights",
    "GemmTiles",
    "MoeTileConfig",
    "Routing",
    "fused_moe",
    "fused_moe_triton",
    "gelu_tanh",
    "grouped_gemm_down",
    "grouped_gemm_gate_up",
    "padded_capacity",
    "reference",
    "select_tile_config",
    "softmax_topk",
    "topk_gating",
]


def __getattr__(name: str):
    if name in _TRITON_PIECES:
        import importlib

        return getattr(importlib.import_module(f".{_TRITON_PIECES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
