"""What every Triton launcher here decides the same way: interpreter or GPU, and compute dtypes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


def is_interpreted(kernel) -> bool:
    """True when triton was imported with its interpreter on: the kernel then runs on CPU tensors."""
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, *tensors: torch.Tensor) -> None:
    if is_interpreted(kernel):
        return
    for tensor in tensors:
        if tensor is not None and not tensor.is_cuda:
            raise ValueError(f"Triton kernels need CUDA tensors (or triton's interpreter), got {tensor.device}")


@dataclass(frozen=True)
class DotPlan:
    """How a GEMM kernel feeds tl.dot for given activations."""

    dot_fp32: bool  # upcast both operands to float32 before tl.dot (weights still round to x.dtype first)
    precision: str  # tl.dot input_precision

    @classmethod
    def for_activations(cls, kernel, dtype: torch.dtype) -> DotPlan:
        interpreted = is_interpreted(kernel)
        if interpreted and dtype == torch.bfloat16:
            # Triton 3.9's interpreter computes garbage in bfloat16 (dot, arithmetic, atomics).
            raise ValueError("the Triton interpreter cannot run bfloat16 activations; use float16/float32")
        dot_fp32 = interpreted or dtype == torch.float32
        # float32 activations must not silently drop to tf32: the reference numerics are float32.
        return cls(dot_fp32=dot_fp32, precision="ieee" if dot_fp32 else "tf32")


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))
