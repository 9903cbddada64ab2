"""Engine configuration: one frozen dataclass, validated where it is made. No torch: the gateway
reads it too (the application's configuration holds one)."""
from __future__ import annotations

from dataclasses import dataclass

from services.config_checks import non_negative_number, positive_int

ENGINE_BACKENDS = ("native", "vllm")
# The names services.model.checkpoint.load_model accepts (tests/test_engine_api.py keeps them equal).
DTYPES = ("float32", "bfloat16", "float16")
EXPERT_DTYPES = ("auto", "int8", *DTYPES)
LOAD_FORMATS = ("auto", "release", "safetensors", "hf", "dummy")
# Ray's placement-group strategies, for the bundles of one parallel group (one per rank).
PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # a preset name or a checkpoint directory
    dtype: str = "float32"
    # Expert storage (services.model.checkpoint.EXPERT_DTYPES): auto, int8 (H100), bfloat16 (H200).
    expert_dtype: str = "auto"
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
    # Request priorities order admission; a waiting request is passed over by at most this many later
    # arrivals (services/engine/scheduler.py). 0: strict arrival order.
    max_overtakes: int = 32
    # One model instance over N ranks (services/engine/parallel.py): rank 0 here, N - 1 Ray actors.
    parallel_size: int = 1
    collective_timeout_s: float = 30.0  # a rank silent this long inside a step fails the engine
    # Where the ranks go (docs/parallelism.md, "Placement"): STRICT_PACK keeps the group on one node
    # (NVLink; the default); PACK fills one node and spans when it must; STRICT_SPREAD puts every rank
    # on a node of its own; SPREAD spreads them as far as the nodes allow.
    placement_strategy: str = "STRICT_PACK"
    # native: services.engine. vllm: vLLM's engine with the Grok-1 plugin (services/vllm_plugin), in the
    # same engine deployment behind the same gateway; needs vLLM installed and a checkpoint directory.
    backend: str = "native"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype must be one of {EXPERT_DTYPES}, got {self.expert_dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        for name in ("block_size", "kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens",
                     "parallel_size"):
            positive_int("engine", name, getattr(self, name))
        if isinstance(self.max_overtakes, bool) or not isinstance(self.max_overtakes, int) or self.max_overtakes < 0:
            raise ValueError(f"engine.max_overtakes must be an integer >= 0, got {self.max_overtakes!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            positive_int("engine", name, getattr(self, name), allow_none=True)
        if self.backend not in ENGINE_BACKENDS:
            raise ValueError(f"EngineConfig.backend must be one of {ENGINE_BACKENDS}, got {self.backend!r}")
        if self.backend == "vllm" and self.parallel_size != 1:
            raise ValueError("EngineConfig.backend 'vllm' runs one rank per replica: parallel_size must be 1")
        non_negative_number("engine", "collective_timeout_s", self.collective_timeout_s, positive=True)
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"engine.placement_strategy must be one of {PLACEMENT_STRATEGIES}, "
                             f"got {self.placement_strategy!r}")

    def context_length(self, model_max_seq_len: int) -> int:
        """max_model_len as served: the configured one, never beyond the model's own context."""
        return min(self.max_model_len or model_max_seq_len, model_max_seq_len)
