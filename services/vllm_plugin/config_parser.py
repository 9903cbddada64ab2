"""config_format="grok1": a Grok-1 checkpoint directory's own config -> the config vLLM reads."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from services.model.checkpoint import resolve_source
from services.model.config import Grok1Config
from services.vllm_plugin.names import ARCHITECTURE, FORMAT


def hf_config_dict(config: Grok1Config) -> dict:
    """The fields vLLM sizes the engine from (KV cache, context length, vocabulary), under the names it
    expects, plus the whole Grok-1 config under `grok1` for the model to rebuild exactly."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "grok1",
        "vocab_size": config.vocab_size,
        "hidden_size": config.emb_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_q_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.key_size,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.num_selected_experts,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "tie_word_embeddings": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "grok1": dataclasses.asdict(config),
    }


def grok1_config(hf_config) -> Grok1Config:
    return Grok1Config(**hf_config.grok1)


def register_config_parser() -> None:
    from transformers import PretrainedConfig
    from vllm.transformers_utils.config import _CONFIG_FORMAT_TO_CONFIG_PARSER, register_config_parser
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    if FORMAT in _CONFIG_FORMAT_TO_CONFIG_PARSER:
        return

    @register_config_parser(FORMAT)
    class Grok1ConfigParser(ConfigParserBase):
        def parse(self, model: str | Path, trust_remote_code: bool, revision: str | None = None,
                  code_revision: str | None = None, **kwargs) -> tuple[dict, PretrainedConfig]:
            config, _, _ = resolve_source(model)
            data = hf_config_dict(config)
            return data, PretrainedConfig(**data)
