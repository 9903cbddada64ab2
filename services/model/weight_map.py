"""Where each released parameter goes in the model, and which part of it a rank keeps.

A data table, not code per tensor: each release path pattern names the destination module or buffer,
how tensor parallelism splits it, and, for the expert up-projections, which half of `linear_linear_v`
it fills. Loaders for other layouts map their names onto these release paths first.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from services.model.config import Grok1Config
from services.model.shard import Shard


class Split(enum.Enum):
    NONE = "replicated"
    VOCAB = "vocabulary rows"
    Q_COLS = "q-head columns"
    KV_COLS = "kv-head columns"
    Q_ROWS = "q-head rows"
    EXPERTS = "experts"


@dataclass(frozen=True)
class Target:
    dest: str  # a buffer, or a module holding `w` (and `scales` when int8)
    split: Split
    half: int | None = None  # 0: `linear`, 1: `linear_v` inside linear_linear_v


_LAYER = "transformer/decoder_layer_{i}/"
_DEST = "decoder_layer.{i}."
RELEASE_TABLE: dict[str, Target] = {
    "language_model/in_out_embed/embeddings": Target("in_out_embed.embeddings", Split.VOCAB),
    "language_model/rms_norm/scale": Target("rms_norm.scale", Split.NONE),
    _LAYER + "multi_head_attention/query/w": Target(_DEST + "multi_head_attention.query", Split.Q_COLS),
    _LAYER + "multi_head_attention/key/w": Target(_DEST + "multi_head_attention.key", Split.KV_COLS),
    _LAYER + "multi_head_attention/value/w": Target(_DEST + "multi_head_attention.value", Split.KV_COLS),
    _LAYER + "multi_head_attention/linear/w": Target(_DEST + "multi_head_attention.linear", Split.Q_ROWS),
    _LAYER + "rms_norm/scale": Target(_DEST + "rms_norm.scale", Split.NONE),
    _LAYER + "rms_norm_1/scale": Target(_DEST + "rms_norm_1.scale", Split.NONE),
    _LAYER + "rms_norm_2/scale": Target(_DEST + "rms_norm_2.scale", Split.NONE),
    _LAYER + "rms_norm_3/scale": Target(_DEST + "rms_norm_3.scale", Split.NONE),
    _LAYER + "router/w": Target(_DEST + "router.w", Split.NONE),
    _LAYER + "moe/linear/w": Target(_DEST + "moe.linear_linear_v", Split.EXPERTS, half=0),
    _LAYER + "moe/linear_v/w": Target(_DEST + "moe.linear_linear_v", Split.EXPERTS, half=1),
    _LAYER + "moe/linear_1/w": Target(_DEST + "moe.linear_1", Split.EXPERTS),
}
_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v)
             for k, v in RELEASE_TABLE.items()]


def target(name: str) -> Target:
    for pattern, t in _PATTERNS:
        m = pattern.match(name)
        if m:
            return Target(t.dest.format(i=m.group(1)) if m.groups() else t.dest, t.split, t.half)
    raise KeyError(f"unknown Grok-1 parameter {name!r}")


def release_shape(name: str, config: Grok1Config) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Full (unsharded) shape of a released parameter and of its int8 scales (None: not quantized)."""
    d, f, e, r = config.emb_size, config.ffn_size, config.num_experts, config.int8_row_blocks
    leaf = name.split("/", 2)[-1] if name.startswith("transformer/") else name
    shapes = {
        "language_model/in_out_embed/embeddings": ((config.vocab_size, d), None),
        "language_model/rms_norm/scale": ((d,), None),
        "multi_head_attention/query/w": ((d, config.q_size), (1, config.q_size)),
        "multi_head_attention/key/w": ((d, config.kv_size), (1, config.kv_size)),
        "multi_head_attention/value/w": ((d, config.kv_size), (1, config.kv_size)),
        "multi_head_attention/linear/w": ((config.q_size, d), (r, d)),
        "router/w": ((d, e), None),
        "moe/linear/w": ((e, d, f), (e, 1, f)),
        "moe/linear_v/w": ((e, d, f), (e, 1, f)),
        "moe/linear_1/w": ((e, f, d), (e, r, d)),
    }
    if leaf.startswith("rms_norm"):
        return (d,), None
    return shapes[leaf]


def shard_index(split: Split, shape: tuple[int, ...], config: Grok1Config, shard: Shard,
                is_scales: bool) -> tuple:
    """Index that selects this rank's part of a parameter (or of its scales) of the given full shape."""
    if shard.size == 1 or split is Split.NONE:
        return (...,)
    if split is Split.VOCAB:
        rows = shard.vocab_rows(config)
        return (slice(rows.start, rows.stop),)
    if split is Split.EXPERTS:
        return (slice(shard.rank, None, shard.size),)
    if split in (Split.Q_COLS, Split.KV_COLS):
        n = shape[-1] // shard.size
        return (..., slice(shard.rank * n, (shard.rank + 1) * n))
    # Q_ROWS: the weight's rows, or the matching row blocks of its scales.
    n = shape[-2] // shard.size
    if is_scales and n == 0:  # fewer row blocks than ranks: each rank's rows share one block
        block = shard.rank * shape[-2] // shard.size
        return (..., slice(block, block + 1), slice(None))
    return (..., slice(shard.rank * n, (shard.rank + 1) * n), slice(None))
