#!/usr/bin/env python3
"""Write a MixtralForCausalLM model directory for the vLLM peer.

vLLM has no Grok-1 implementation any more, so the peer serves a Mixtral
model with the same shape as the grok-serve preset being compared. Only the
config is written: the peer runs with ``--load-format dummy`` (random weights),
so no weight files are needed.

Stdlib only; it runs with the peer venv's python (or any python3) and does not
import the project.

Examples::

    python mixtral_config.py /tmp/peer-model                 # cpu-bench shape
    python mixtral_config.py /tmp/peer-model --dtype bfloat16
    python mixtral_config.py /tmp/peer-model --from-json preset.json
    python mixtral_config.py /tmp/peer-model --hidden-size 2048 --num-layers 4

``--from-json`` accepts either Mixtral/HF key names (``num_local_experts``,
``num_hidden_layers`` ...), the Grok-1 reference config.json names
(``emb_size``, ``key_size``, ``num_q_heads``, ``num_layers``,
``widening_factor``/``ffn_size``, ``num_selected_experts``, ``sequence_len``)
or the other aliases listed in ``ALIASES``; explicit command-line flags
override values read from the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Defaults: the grok-serve ``cpu-bench`` preset dimensions.
DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_hidden_layers": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32768,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Alternative spellings accepted in --from-json input (mapped to HF names).
ALIASES: dict[str, str] = {
    "dim": "hidden_size",
    "d_model": "hidden_size",
    "emb_size": "hidden_size",
    "ffn_dim": "intermediate_size",
    "ffn_size": "intermediate_size",
    "ffn_hidden_size": "intermediate_size",
    "n_heads": "num_attention_heads",
    "num_q_heads": "num_attention_heads",
    "num_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "num_kv_heads": "num_key_value_heads",
    "key_size": "head_dim",
    "n_layers": "num_hidden_layers",
    "num_layers": "num_hidden_layers",
    "n_experts": "num_local_experts",
    "num_experts": "num_local_experts",
    "top_k": "num_experts_per_tok",
    "num_selected_experts": "num_experts_per_tok",
    "experts_per_token": "num_experts_per_tok",
    "max_seq_len": "max_position_embeddings",
    "max_position": "max_position_embeddings",
    "sequence_len": "max_position_embeddings",
    "rope_base": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "dtype": "torch_dtype",
    "eos_token": "eos_token_id",
    "bos_token": "bos_token_id",
}

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16", "float": "float32"}

INT_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_hidden_layers",
            "num_local_experts", "num_experts_per_tok", "vocab_size",
            "max_position_embeddings", "bos_token_id", "eos_token_id")


def _norm_dtype(value: str) -> str:
    v = str(value).lower().replace("torch.", "")
    v = _DTYPE_ALIASES.get(v, v)
    if v not in DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; use one of {DTYPES}")
    return v


def load_json_dims(path: str) -> dict[str, Any]:
    """Read dimensions from a JSON file (flat object, or nested under
    ``"model"`` / ``"config"``); unknown keys are ignored."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object")
    for nest in ("model", "config"):
        if isinstance(data.get(nest), dict):
            data = {**data, **data[nest]}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = ALIASES.get(key, key)
        if name in DEFAULTS and value is not None:
            out[name] = value
    # Grok-1 reference configs may give only widening_factor; derive the
    # expert FFN width with the reference rule (2/3 of the widened size,
    # rounded up to a multiple of 8).
    if "intermediate_size" not in out and "widening_factor" in data:
        size = int(float(data["widening_factor"]) * int(out.get("hidden_size", DEFAULTS["hidden_size"]))) * 2 // 3
        out["intermediate_size"] = size + (8 - size) % 8
    return out


def build_config(dims: dict[str, Any]) -> dict[str, Any]:
    d = {**DEFAULTS, **dims}
    for k in INT_KEYS:
        d[k] = int(d[k])
    d["rope_theta"] = float(d["rope_theta"])
    d["rms_norm_eps"] = float(d["rms_norm_eps"])
    d["tie_word_embeddings"] = bool(d["tie_word_embeddings"])
    d["torch_dtype"] = _norm_dtype(d["torch_dtype"])

    if d["num_attention_heads"] % d["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of "
                         "num_key_value_heads")
    if not 1 <= d["num_experts_per_tok"] <= d["num_local_experts"]:
        raise ValueError("need 1 <= num_experts_per_tok <= num_local_experts")
    if d["head_dim"] % 2:
        raise ValueError("head_dim must be even (rotary embedding)")

    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_dim"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_local_experts": d["num_local_experts"],
        "num_experts_per_tok": d["num_experts_per_tok"],
        "vocab_size": d["vocab_size"],
        "max_position_embeddings": d["max_position_embeddings"],
        # Older transformers read rope_theta, newer ones rope_parameters.
        "rope_theta": d["rope_theta"],
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": d["rope_theta"]},
        "rms_norm_eps": d["rms_norm_eps"],
        "tie_word_embeddings": d["tie_word_embeddings"],
        # Older transformers read torch_dtype, newer ones dtype.
        "torch_dtype": d["torch_dtype"],
        "dtype": d["torch_dtype"],
        "hidden_act": "silu",
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": d["bos_token_id"],
        "eos_token_id": d["eos_token_id"],
        "pad_token_id": None,
    }


def write_model_dir(path: str, config: dict[str, Any]) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        # Greedy by default; the benchmarks set sampling explicitly anyway.
        "do_sample": False,
    }
    with open(os.path.join(path, "generation_config.json"), "w",
              encoding="utf-8") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
        f.write("\n")


def param_count(c: dict[str, Any]) -> int:
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    q = c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    attn = h * (q + 2 * kv) + q * h
    moe = c["num_local_experts"] * 3 * h * i + h * c["num_local_experts"]
    per_layer = attn + moe + 2 * h
    emb = c["vocab_size"] * h
    head = 0 if c["tie_word_embeddings"] else emb
    return L * per_layer + emb + head + h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="model directory to create/overwrite")
    p.add_argument("--from-json", metavar="FILE",
                   help="read dimensions from a JSON file first")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-key-value-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--num-layers", "--num-hidden-layers", type=int,
                   dest="num_hidden_layers")
    p.add_argument("--num-experts", "--num-local-experts", type=int,
                   dest="num_local_experts")
    p.add_argument("--top-k", "--num-experts-per-tok", type=int,
                   dest="num_experts_per_tok")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--max-position-embeddings", "--max-seq-len", type=int,
                   dest="max_position_embeddings")
    p.add_argument("--rope-theta", type=float)
    p.add_argument("--rms-norm-eps", type=float)
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tie-word-embeddings", dest="tie_word_embeddings",
                     action="store_true", default=None)
    tie.add_argument("--no-tie-word-embeddings", dest="tie_word_embeddings",
                     action="store_false")
    p.add_argument("--dtype", dest="torch_dtype",
                   help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    dims: dict[str, Any] = {}
    if args.from_json:
        dims.update(load_json_dims(args.from_json))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            dims[key] = value

    try:
        config = build_config(dims)
    except (ValueError, TypeError) as e:
        print(f"mixtral_config.py: {e}", file=sys.stderr)
        return 2
    write_model_dir(args.out_dir, config)
    if not args.quiet:
        print(json.dumps({"model_dir": os.path.abspath(args.out_dir),
                          "params": param_count(config),
                          "dtype": config["torch_dtype"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
