"""The MoE layer entry point: Triton kernels on CUDA, the fastest correct torch path on CPU."""
from __future__ import annotations

import torch

from .cpu_moe import float32_mm, fused_moe_cpu
from .cpu_packing import pack_weight, packed_matmul
from .expert_weights import ExpertWeights

__all__ = ["MOE_BACKENDS", "ExpertWeights", "dense_matmul", "fused_moe", "pack_weight"]

# auto: Triton on CUDA, torch elsewhere. triton also runs CPU tensors under triton's interpreter,
# which is how the golden tests exercise the GPU kernels on a machine without one.
MOE_BACKENDS = ("auto", "triton", "torch")


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertWeights, top_k: int,
              expert_map: torch.Tensor | None = None,
              expert_counts_out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x [T, D] (fp32/bf16/fp16); router_logits fp32 [T, E] (E = number of experts globally).
    Returns [T, D] in x.dtype: sum over the top_k chosen experts of prob * expert(x), where
    probs = softmax over all E (fp32, not renormalized) and
    expert(x) = (gelu_tanh(x @ linear) * (x @ linear_v)) @ linear_1.
    expert_map: int32 [E], global expert id -> local index into `experts`, or -1 when that expert is
    not held here (those routes contribute nothing; the caller all-reduces partial sums).
    None = all E local, identity.
    expert_counts_out: optional int64 [E]; tokens routed to each global expert are added in place.
    backend: one of MOE_BACKENDS.
    On CUDA nothing here waits on the device."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"MoE backend must be one of {MOE_BACKENDS}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        # Imported here so that CPU-only processes never load triton.
        from .triton_moe import fused_moe_triton

        return fused_moe_triton(x, router_logits, experts, top_k, expert_map, expert_counts_out)
    return fused_moe_cpu(x, router_logits, experts, top_k, expert_map, expert_counts_out)


def dense_matmul(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w [K, N] for the model's dense layers (attention projections, LM head). float32 on
    CPU goes to oneDNN like the experts: MKL's sgemm takes a generic path on AMD CPUs, and a decode
    step at batch 8 on cpu-bench ran 16 % faster this way (docs/benchmarks.md)."""
    if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] > 0:
        # `packed`: w laid out once for oneDNN (kernels.cpu_packing). A single row runs faster on the
        # plain GEMV kernel, given [out, in] storage.
        return float32_mm(x, w) if packed is None or x.shape[0] == 1 else packed_matmul(x, packed)
    if packed is not None and x.dtype == w.dtype == torch.bfloat16 and x.shape[0] > 0:
        return packed_matmul(x, packed)  # packed only where the CPU has native bfloat16
    return x @ w
