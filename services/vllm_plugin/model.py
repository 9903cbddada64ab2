"""Grok1ForCausalLM for vLLM: services.model's Grok-1 layers, vLLM's attention and KV cache.

Everything but the paged attention is the native model's code (embedding, RoPE, the four RMSNorms,
the float32 router, the MoE through kernels.dispatch, the tied output with its multiplier), so both
engines compute the same numerics and load through the same loader.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from services.model.grok1 import Grok1
from services.vllm_plugin.attention import VllmMultiHeadAttention, padded_head_size
from services.vllm_plugin.config_parser import grok1_config
from services.vllm_plugin.names import FORMAT

# Legend: T tokens in the step, D emb_size, V vocabulary.


def _supported_head_sizes() -> list[int] | None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None  # GPU backends take any multiple of 8 up to 256, Grok-1's 128 included
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()


class Grok1ForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention
        from vllm.platforms import current_platform

        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError("the Grok-1 vLLM plugin runs one rank per model (tensor_parallel_size=1, "
                             "pipeline_parallel_size=1); use grok-serve's native engine for expert "
                             "parallelism")
        config = grok1_config(vllm_config.model_config.hf_config)
        dtype = vllm_config.model_config.dtype
        # int8 weights stay int8 on CUDA (the Triton kernels dequantize in the GEMM, W8A16); CPU
        # dequantizes once at load, as the native engine does.
        self.model = Grok1(config, dtype, int8=current_platform.is_cuda_alike())
        self.config = vllm_config.model_config.hf_config
        head_size = padded_head_size(config.key_size, _supported_head_sizes())
        model_prefix = f"{prefix}.model" if prefix else "model"
        for i, layer in enumerate(self.model.decoder_layer):
            block = layer.multi_head_attention
            attn = Attention(block.num_q_heads, head_size, config.attn_output_multiplier,
                             num_kv_heads=block.num_kv_heads, cache_config=vllm_config.cache_config,
                             logits_soft_cap=config.attn_logit_softcap,
                             prefix=f"{model_prefix}.decoder_layer.{i}.multi_head_attention.attn")
            layer.multi_head_attention = VllmMultiHeadAttention(block, attn, head_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)  # [T, D]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        grok = self.model
        for layer in grok.decoder_layer:
            # The KV cache, attention metadata and workspace are vLLM's, reached through its forward
            # context: the native arguments for them stay None.
            h = layer(h, positions, grok.rope, grok.comm, None, None, None, None, None)
        return h  # [T, D], before the output norm

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden_states)  # [T, V] float32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        raise ValueError(f"Grok-1 loads through the plugin's own loader: pass load_format={FORMAT!r} "
                         f"(and config_format={FORMAT!r})")
