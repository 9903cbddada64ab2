"""The expert weights one rank holds for one MoE layer, as the kernels consume them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Legend: E = local experts, D = hidden size, F = ffn size, R = scale row blocks.


def _check_scales(name: str, weight: torch.Tensor, scales: torch.Tensor | None) -> None:
    if weight.dtype != torch.int8:
        if scales is not None:
            raise ValueError(f"ExpertWeights.{name}_scales given but {name} is {weight.dtype}, not int8")
        return
    if scales is None:
        raise ValueError(f"ExpertWeights.{name} is int8 and needs {name}_scales")
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"ExpertWeights.{name}_scales must be floating point (bfloat16 in the release), "
                         f"got {scales.dtype}")
    num_experts, rows, cols = weight.shape
    if scales.dim() != 3 or scales.shape[0] != num_experts or scales.shape[2] != cols:
        raise ValueError(f"ExpertWeights.{name}_scales must be [{num_experts}, R, {cols}], "
                         f"got {list(scales.shape)}")
    if rows % scales.shape[1]:
        raise ValueError(f"ExpertWeights.{name}_scales has {scales.shape[1]} row blocks, which do not "
                         f"divide the {rows} rows of {name}")
    if scales.device != weight.device:
        raise ValueError(f"ExpertWeights.{name}_scales is on {scales.device}, {name} on {weight.device}")


@dataclass(frozen=True)
class ExpertWeights:
    """Checkpoint layout [in, out] (y = x @ w). int8 weights carry row-blocked scales: row k of a
    [K, N] weight with scales [R, N] is multiplied by scale row k // (K // R).

    Any strides are accepted and every kernel follows them. On CPU, bfloat16 experts are fastest
    stored [out, in] (nn.Linear's order) and passed as the transposed view: torch's fast bfloat16
    GEMV reads K contiguously (docs/benchmarks.md, "MoE layer kernels")."""

    w13: torch.Tensor  # [E, D, 2F]  [linear | linear_v] concatenated on the output dim
    w2: torch.Tensor  # [E, F, D]   linear_1
    w13_scales: torch.Tensor | None = None  # [E, R13, 2F] when w13 is int8
    w2_scales: torch.Tensor | None = None  # [E, R2, D] when w2 is int8
    # float32 on CPU: each expert's w13 and w2 packed once for oneDNN (kernels.cpu_packing); the CPU
    # path uses them instead of w13/w2, which stay the reference for every other path.
    packed13: tuple[torch.Tensor, ...] | None = None
    packed2: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("w13", "w2"):
            weight = getattr(self, name)
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"ExpertWeights.{name} must be a torch.Tensor, got {type(weight).__name__}")
            if weight.dim() != 3:
                raise ValueError(f"ExpertWeights.{name} must be 3-D [experts, in, out], "
                                 f"got shape {list(weight.shape)}")
            if weight.dtype not in WEIGHT_DTYPES:
                raise ValueError(f"ExpertWeights.{name} dtype {weight.dtype} is not one of "
                                 f"{[str(d) for d in WEIGHT_DTYPES]}")
        num_experts, hidden, two_ffn = self.w13.shape
        if two_ffn % 2:
            raise ValueError(f"ExpertWeights.w13 output dim {two_ffn} must be even ([linear | linear_v])")
        if self.w2.shape != (num_experts, two_ffn // 2, hidden):
            raise ValueError(f"ExpertWeights.w2 must be [{num_experts}, {two_ffn // 2}, {hidden}] to match "
                             f"w13 {list(self.w13.shape)}, got {list(self.w2.shape)}")
        if num_experts == 0:
            raise ValueError("ExpertWeights holds no experts")
        if self.w2.device != self.w13.device:
            raise ValueError(f"ExpertWeights.w13 is on {self.w13.device}, w2 on {self.w2.device}")
        _check_scales("w13", self.w13, self.w13_scales)
        _check_scales("w2", self.w2, self.w2_scales)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[1]

    @property
    def ffn_size(self) -> int:
        return self.w2.shape[1]

    @property
    def device(self) -> torch.device:
        return self.w13.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.w13.dtype
