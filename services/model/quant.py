"""int8 weight-only quantization as released: int8 weights with bfloat16 scales, row-blocked.

A weight [..., K, N] has scales [..., R, N]; row k is scaled by scale row k // (K // R). The release has
R = 1 for column-parallel weights and R = 8 for the row-parallel ones (one row block per original shard).
"""
from __future__ import annotations

import torch


def dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # weight: [..., K, N] int8; scales: [..., R, N]
    *lead, K, N = weight.shape
    R = scales.shape[-2]
    if K % R:
        raise ValueError(f"{R} scale row blocks do not split {K} weight rows evenly")
    # The reference multiplies in float32 and only then rounds (to bfloat16 in bfloat16 runs).
    blocks = weight.float().reshape(*lead, R, K // R, N) * scales.float().unsqueeze(-2)
    return blocks.reshape(*lead, K, N).to(dtype)


def quantize(weight: torch.Tensor, row_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-(row block, column) int8 quantization, the inverse used for tests and dummy weights."""
    *lead, K, N = weight.shape
    blocks = weight.float().reshape(*lead, row_blocks, K // row_blocks, N)
    scales = (blocks.abs().amax(dim=-2) / 127.0).clamp_min(1e-8).to(torch.bfloat16)  # [..., R, N]
    q = torch.round(blocks / scales.float().unsqueeze(-2)).clamp(-127, 127).to(torch.int8)
    return q.reshape(*lead, K, N), scales
