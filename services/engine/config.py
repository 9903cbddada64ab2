"""Engine configuration: one frozen dataclass, validated where it is made."""
from __future__ import annotations

import math
from dataclasses import dataclass

from services.model.checkpoint import LOAD_FORMATS, TORCH_DTYPES

ENGINE_BACKENDS = ("native", "vllm")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # a preset name or a checkpoint directory
    dtype: str = "float32"
    load_format: str = "auto"
    seed: int = 0  # dummy weights and unseeded sampling
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory_bytes: int = 512 << 20
    num_kv_blocks: int | None = None  # overrides the memory budget
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step: decodes plus prefill chunks
    max_model_len: int | None = None  # default: the model's context (8192 for Grok-1)
    enable_prefix_caching: bool = True
    # One model instance over N ranks (services/engine/parallel.py): rank 0 here, N - 1 Ray actors.
    parallel_size: int = 1
    collective_timeout_s: float = 30.0  # a rank silent this long inside a step fails the engine
    # native: services.engine. vllm: vLLM's engine with the Grok-1 plugin (services/vllm_plugin), in the
    # same engine deployment behind the same gateway; needs vLLM installed and a checkpoint directory.
    backend: str = "native"

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        for name in ("block_size", "kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens",
                     "parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"EngineConfig.{name} must be a positive integer or None, got {value!r}")
        if self.backend not in ENGINE_BACKENDS:
            raise ValueError(f"EngineConfig.backend must be one of {ENGINE_BACKENDS}, got {self.backend!r}")
        if self.backend == "vllm" and self.parallel_size != 1:
            raise ValueError("EngineConfig.backend 'vllm' runs one rank per replica: parallel_size must be 1")
        timeout = self.collective_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"EngineConfig.collective_timeout_s must be a positive number of seconds, "
                             f"got {timeout!r}")

    def context_length(self, model_max_seq_len: int) -> int:
        """max_model_len as served: the configured one, never beyond the model's own context."""
        return min(self.max_model_len or model_max_seq_len, model_max_seq_len)
