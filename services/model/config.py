"""Grok-1 hyper-parameters: one frozen dataclass, presets, and the reference config.json reader."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def ffn_size(emb_size: int, widening_factor: float) -> int:
    # The reference's rule (model.py `ffn_size`): 2/3 of the widened size, rounded up to a multiple of 8.
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


# The reference's own names, as in ../grok1-reference/tiny/config.json.
_REFERENCE_KEYS = {
    "vocab_size": "vocab_size", "emb_size": "emb_size", "key_size": "key_size",
    "num_q_heads": "num_q_heads", "num_kv_heads": "num_kv_heads", "num_layers": "num_layers",
    "widening_factor": "widening_factor", "num_experts": "num_experts",
    "num_selected_experts": "num_selected_experts", "attn_output_multiplier": "attn_output_multiplier",
    "embedding_multiplier_scale": "embedding_multiplier_scale",
    "output_multiplier_scale": "output_multiplier_scale", "pad_token": "pad_token_id",
    "eos_token": "eos_token_id", "sequence_len": "max_seq_len", "int8_row_blocks": "int8_row_blocks",
}


@dataclass(frozen=True)
class Grok1Config:
    vocab_size: int = 131072
    emb_size: int = 6144
    key_size: int = 128
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    widening_factor: float = 8.0
    num_experts: int = 8
    num_selected_experts: int = 2
    # The reference multipliers: 1/sqrt(128), sqrt(6144)=78.38367, 1/sqrt(3).
    attn_output_multiplier: float = 0.08838834764831845
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    # Attention logits are soft-capped as cap * tanh(logits / cap) (the reference's max_attn_val).
    attn_logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 8192
    pad_token_id: int = 0
    eos_token_id: int = 2
    bos_token_id: int = 1
    # Row blocks of the row-parallel int8 weights' scales (the release: 8, one per model-parallel shard).
    int8_row_blocks: int = 8

    def __post_init__(self) -> None:
        positive = ("vocab_size", "emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers",
                    "num_experts", "num_selected_experts", "max_seq_len", "int8_row_blocks")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Grok1Config.{name} must be a positive integer, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.key_size % 2:
            raise ValueError(f"key_size must be even for rotary embeddings, got {self.key_size}")
        if not 1 <= self.num_selected_experts <= self.num_experts:
            raise ValueError(f"num_selected_experts ({self.num_selected_experts}) must be in "
                             f"[1, num_experts={self.num_experts}]")
        if not self.widening_factor > 0:
            raise ValueError(f"widening_factor must be positive, got {self.widening_factor}")
        for name in ("attn_output_multiplier", "embedding_multiplier_scale", "output_multiplier_scale",
                     "attn_logit_softcap", "rope_base", "rms_norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Grok1Config.{name} must be a positive finite number, got {value!r}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) is outside the vocabulary [0, {self.vocab_size})")
        for name in ("q_size", "ffn_size"):
            # The row-parallel weights' scales split their input dimension into equal row blocks.
            if getattr(self, name) % self.int8_row_blocks:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of "
                                 f"int8_row_blocks ({self.int8_row_blocks})")

    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.key_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.key_size

    @property
    def num_parameters(self) -> int:
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        layer = attn + d * e + 3 * e * d * f + 4 * d
        return self.num_layers * layer + self.vocab_size * d + d

    def replace(self, **changes) -> Grok1Config:
        return dataclasses.replace(self, **changes)


    @classmethod
    def from_reference_dict(cls, data: dict) -> Grok1Config:
        derived = {"ffn_size"}
        unknown = set(data) - set(_REFERENCE_KEYS) - derived
        if unknown:
            raise ValueError(f"unknown keys in Grok-1 config: {sorted(unknown)}")
        kwargs = {_REFERENCE_KEYS[k]: v for k, v in data.items() if k in _REFERENCE_KEYS}
        config = cls(**kwargs)
        if "ffn_size" in data and data["ffn_size"] != config.ffn_size:
            raise ValueError(f"config ffn_size {data['ffn_size']} disagrees with the one derived from "
                             f"emb_size and widening_factor ({config.ffn_size})")
        return config

    def to_reference_dict(self) -> dict:
        out = {ref: getattr(self, ours) for ref, ours in _REFERENCE_KEYS.items()}
        out["ffn_size"] = self.ffn_size
        return out

    @classmethod
    def from_dir(cls, path: str | Path) -> Grok1Config:
        """A checkpoint directory's config.json, or Grok-1 itself when there is none (the release)."""
        config_file = Path(path) / "config.json"
        if not config_file.exists():
            return PRESETS["grok-1"]
        try:
            data = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
        try:
            return cls.from_reference_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{config_file}: {exc}") from None


PRESETS: dict[str, Grok1Config] = {
    # run.py of the release.
    "grok-1": Grok1Config(),
    # The embedded default: Grok-1's architecture at toy size, answers in milliseconds on 2 cores.
    "tiny": Grok1Config(
        vocab_size=512, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2,
        # Embedding multiplier 1: with random tied embeddings a larger one makes the last token's own
        # embedding dominate the output, and greedy decoding repeats it forever.
        widening_factor=4.0, attn_output_multiplier=0.25, embedding_multiplier_scale=1.0,
        output_multiplier_scale=0.5773502691896257, max_seq_len=2048, int8_row_blocks=8,
    ),
    # CPU benchmarks: big enough that weight streaming dominates, small enough for 2 cores.
    # Mixtral with hidden 1024, intermediate 2048, 16/8 heads of 64, 8 experts top-2 has these shapes.
    "cpu-bench": Grok1Config(
        vocab_size=32768, emb_size=1024, key_size=64, num_q_heads=16, num_kv_heads=8, num_layers=8,
        widening_factor=3.0, attn_output_multiplier=0.125, embedding_multiplier_scale=32.0,
        output_multiplier_scale=0.5773502691896257, max_seq_len=4096,
    ),
}


def get_preset(name: str) -> Grok1Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
