"""Grok-1 for vLLM: an out-of-tree model with the reference numerics, registered through vLLM's
`vllm.general_plugins` entry point (pyproject.toml).

    LLM(model=<checkpoint dir>, config_format="grok1", load_format="grok1", skip_tokenizer_init=True)

reads the release's `ckpt-0` pickles, converted safetensors or a Hugging Face layout through
services.model's loader (restricted unpickler included). Supported: vLLM 0.32 (see
docs/vllm_plugin.md). Importing this package does not import vLLM; register() does.
"""
from __future__ import annotations

from services.vllm_plugin.names import ARCHITECTURE, FORMAT

__all__ = ["ARCHITECTURE", "FORMAT", "register"]


def register() -> None:
    """vLLM calls this in every process it starts (engine core, workers); it must be idempotent."""
    from vllm import ModelRegistry

    from services.vllm_plugin.config_parser import register_config_parser
    from services.vllm_plugin.loader import register_loader

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "services.vllm_plugin.model:Grok1ForCausalLM")
    register_config_parser()
    register_loader()
