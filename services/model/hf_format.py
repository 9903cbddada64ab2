"""Hugging Face layouts of Grok-1: the hpcai-tech port and the keyfan port, mapped onto release names.

Both ports store float weights (no int8 scales) as `nn.Linear` matrices, [out, in], while the release
keeps [in, out]; both split each layer's experts into separate modules, which the release stacks as
[E, in, out]. A layout is therefore a table: HF name pattern -> release name, whether to transpose, and
(`{e}` in the pattern) whether E per-expert tensors stack into one release parameter. Loading streams one
release parameter at a time (one layer's experts at most), never the whole checkpoint.

Layouts, as their public modeling code names them:
  hpcai-tech/grok-1 (ColossalAI port, `Grok1ModelForCausalLM`, model_type "grok-1"): `model.embed_tokens`,
    `model.layers.{i}.attn.{q,k,v,o}_proj`, `{pre,post}_{attn,moe}_norm.scale`, `moe_block.gate`,
    `moe_block.experts.{e}.{linear,linear_v,linear_1}`, `model.norm.scale`, tied `lm_head`.
  keyfan/grok-1-hf (`GrokForCausalLM`, model_type "grok"): the release's own names with dots,
    `transformer.in_out_embed`, `transformer.decoder_layer.{i}.multi_head_attention.{query,key,value,linear}`,
    `rms_norm{,_1,_2,_3}.weight`, `router`, `moe.{e}.{linear,linear_v,linear_1}`, `transformer.rms_norm`.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from services.model.config import Grok1Config, ffn_size
from services.model.release_format import CheckpointError
from services.model.weight_map import release_shape

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Grok-1 ties its output projection to the input embedding; a saved `lm_head.weight` must be that copy.
TIED_HEAD = "lm_head.weight"
# Rotary caches some ports saved as buffers; the model recomputes them.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


@dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; `{i}` layer, `{e}` expert (stacked on a leading E axis)
    release: str  # release parameter path; `{i}` layer
    transpose: bool  # nn.Linear [out, in] -> release [in, out]

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf


@dataclass(frozen=True)
class Layout:
    name: str
    embedding: str  # the HF name of the embedding table, also what identifies the layout
    rules: tuple[Rule, ...]


_L = "transformer/decoder_layer_{i}/"
_EMBED, _NORM = "language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"

HPCAI = Layout("hpcai-tech", "model.embed_tokens.weight", (
    Rule("model.embed_tokens.weight", _EMBED, False),  # nn.Embedding is already [V, D]
    Rule("model.norm.scale", _NORM, False),
    Rule("model.layers.{i}.attn.q_proj.weight", _L + "multi_head_attention/query/w", True),
    Rule("model.layers.{i}.attn.k_proj.weight", _L + "multi_head_attention/key/w", True),
    Rule("model.layers.{i}.attn.v_proj.weight", _L + "multi_head_attention/value/w", True),
    Rule("model.layers.{i}.attn.o_proj.weight", _L + "multi_head_attention/linear/w", True),
    # Residual order as the release: pre-attention, post-attention, pre-MoE, post-MoE.
    Rule("model.layers.{i}.pre_attn_norm.scale", _L + "rms_norm/scale", False),
    Rule("model.layers.{i}.post_attn_norm.scale", _L + "rms_norm_1/scale", False),
    Rule("model.layers.{i}.pre_moe_norm.scale", _L + "rms_norm_2/scale", False),
    Rule("model.layers.{i}.post_moe_norm.scale", _L + "rms_norm_3/scale", False),
    Rule("model.layers.{i}.moe_block.gate.weight", _L + "router/w", True),  # [E, D] -> [D, E]
    # `linear` is the GELU-gated input projection, `linear_v` the plain one, `linear_1` the output.
    Rule("model.layers.{i}.moe_block.experts.{e}.linear.weight", _L + "moe/linear/w", True),
    Rule("model.layers.{i}.moe_block.experts.{e}.linear_v.weight", _L + "moe/linear_v/w", True),
    Rule("model.layers.{i}.moe_block.experts.{e}.linear_1.weight", _L + "moe/linear_1/w", True),
))

_K = "transformer.decoder_layer.{i}."
KEYFAN = Layout("keyfan", "transformer.in_out_embed.weight", (
    Rule("transformer.in_out_embed.weight", _EMBED, False),
    Rule("transformer.rms_norm.weight", _NORM, False),
    Rule(_K + "multi_head_attention.query.weight", _L + "multi_head_attention/query/w", True),
    Rule(_K + "multi_head_attention.key.weight", _L + "multi_head_attention/key/w", True),
    Rule(_K + "multi_head_attention.value.weight", _L + "multi_head_attention/value/w", True),
    Rule(_K + "multi_head_attention.linear.weight", _L + "multi_head_attention/linear/w", True),
    Rule(_K + "rms_norm.weight", _L + "rms_norm/scale", False),
    Rule(_K + "rms_norm_1.weight", _L + "rms_norm_1/scale", False),
    Rule(_K + "rms_norm_2.weight", _L + "rms_norm_2/scale", False),
    Rule(_K + "rms_norm_3.weight", _L + "rms_norm_3/scale", False),
    Rule(_K + "router.weight", _L + "router/w", True),
    Rule(_K + "moe.{e}.linear.weight", _L + "moe/linear/w", True),
    Rule(_K + "moe.{e}.linear_v.weight", _L + "moe/linear_v/w", True),
    Rule(_K + "moe.{e}.linear_1.weight", _L + "moe/linear_1/w", True),
))

LAYOUTS = (HPCAI, KEYFAN)

# ---------------------------------------------------------------------------------------------------
# config.json


@dataclass(frozen=True)
class _Key:
    hf: str
    field: str  # the Grok1Config field it sets
    required: bool = True


_KEYS = (
    _Key("vocab_size", "vocab_size"),
    _Key("hidden_size", "emb_size"),
    _Key("num_attention_heads", "num_q_heads"),
    _Key("num_key_value_heads", "num_kv_heads"),
    _Key("num_hidden_layers", "num_layers"),
    _Key("num_experts_per_tok", "num_selected_experts"),
    # Grok-1's multipliers differ from any HF default a tiny config could rely on: they must be spelled out.
    _Key("attn_output_multiplier", "attn_output_multiplier"),
    _Key("embedding_multiplier_scale", "embedding_multiplier_scale"),
    _Key("output_multiplier_scale", "output_multiplier_scale"),
    _Key("rms_norm_eps", "rms_norm_eps", required=False),
    _Key("max_position_embeddings", "max_seq_len", required=False),
    _Key("rope_theta", "rope_base", required=False),  # keyfan's key; hpcai-tech fixes 10000 in code
    _Key("pad_token_id", "pad_token_id", required=False),
    _Key("bos_token_id", "bos_token_id", required=False),
    _Key("eos_token_id", "eos_token_id", required=False),
)
# hpcai-tech says num_experts, keyfan (Mixtral's naming) num_local_experts.
_EXPERT_KEYS = ("num_experts", "num_local_experts")
_GELU = frozenset({"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_accurate"})


def _is_off(value) -> bool:
    return value is None or value is False or value == 0


# Keys whose value this model cannot honour: it computes the reference's numerics, nothing else.
# key -> (acceptable?, what this model does)
_FIXED = {
    "max_attn_value": (lambda v: v == 30, "attention logits are soft-capped at 30 (30 * tanh(x / 30))"),
    "attn_logit_softcapping": (lambda v: v is None or v == 30, "attention logits are soft-capped at 30"),
    "router_logit_softcapping": (_is_off, "router logits are not soft-capped"),
    "final_logit_softcapping": (_is_off, "output logits are not soft-capped"),
    "residual_moe": (_is_off, "each layer has the MoE block only, no residual dense MLP"),
    "tie_word_embeddings": (lambda v: v is True, "the output projection is the input embedding (tied)"),
    "hidden_act": (lambda v: v in _GELU, "the experts use GELU"),
    "rope_scaling": (lambda v: v is None, "rotary embeddings are unscaled"),
    "quantization_config": (lambda v: v is None, "HF checkpoints are read as float weights"),
    "sliding_window": (lambda v: v is None, "attention is full causal"),
}
_KNOWN_TYPES = frozenset({"grok-1", "grok"})
_KNOWN_ARCHITECTURES = frozenset({"Grok1ModelForCausalLM", "Grok1ForCausalLM", "GrokForCausalLM"})


def _read_config_json(path: Path) -> dict | None:
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_hf_dir(path: Path) -> bool:
    """A config.json written by `transformers` (it records model_type / architectures)."""
    data = _read_config_json(path)
    return data is not None and ("model_type" in data or "architectures" in data)


def _widening_factor(emb_size: int, intermediate: int) -> float:
    """The widening factor whose reference `ffn_size` rule gives `intermediate` (Grok-1: 32768 -> 8.0)."""
    widened = 3 * intermediate // 2  # ffn_size takes 2/3 of int(factor * emb_size)
    for w in (widened, widened + 1, widened - 1):
        # w / D exactly when the division is exact (Grok-1), else nudged so int(factor * D) cannot round down.
        for factor in (w / emb_size, (w + 0.5) / emb_size):
            if w > 0 and ffn_size(emb_size, factor) == intermediate:
                return factor
    raise ValueError(f"intermediate_size {intermediate} is not 2/3 of a widened hidden size rounded up to "
                     f"a multiple of 8, as Grok-1's feed-forward size is")


def _row_blocks(q_size: int, ffn: int) -> int:
    # HF weights are float; row blocks only shape the scales when serving int8 quantizes at load.
    # The release uses 8; small test configs fall back to what divides their row-parallel inputs.
    return next(r for r in (8, 4, 2, 1) if q_size % r == 0 and ffn % r == 0)


def _config_from_dict(data: dict) -> Grok1Config:
    model_type, architectures = data.get("model_type"), data.get("architectures") or []
    if model_type not in _KNOWN_TYPES and not _KNOWN_ARCHITECTURES.intersection(architectures):
        raise ValueError(f"model_type {model_type!r} / architectures {architectures} is not a Grok-1 port "
                         f"(expected model_type {sorted(_KNOWN_TYPES)} or {sorted(_KNOWN_ARCHITECTURES)})")
    for key, (ok, meaning) in _FIXED.items():
        if key in data and not ok(data[key]):
            raise ValueError(f"{key}={data[key]!r} is not supported: in this model {meaning}")
    missing = [k.hf for k in _KEYS if k.required and data.get(k.hf) is None]
    experts = [data[k] for k in _EXPERT_KEYS if data.get(k) is not None]
    if not experts:
        missing.append(" or ".join(_EXPERT_KEYS))
    if "intermediate_size" not in data and "widening_factor" not in data:
        missing.append("intermediate_size")
    if missing:
        raise ValueError(f"missing keys: {', '.join(missing)}")
    if len(set(experts)) > 1:
        raise ValueError(f"num_experts and num_local_experts disagree ({experts[0]} vs {experts[1]})")
    # null optional values (e.g. "pad_token_id": null) keep the Grok-1 default.
    kwargs = {k.field: data[k.hf] for k in _KEYS if data.get(k.hf) is not None}
    kwargs["num_experts"] = experts[0]
    d, heads = kwargs["emb_size"], kwargs["num_q_heads"]
    for name in ("emb_size", "num_q_heads"):
        if not isinstance(kwargs[name], int) or kwargs[name] <= 0:
            raise ValueError(f"Grok1Config.{name} must be a positive integer, got {kwargs[name]!r}")
    # Both ports derive the head size from hidden_size / num_attention_heads; honour an explicit head_dim.
    if "head_dim" in data:
        kwargs["key_size"] = data["head_dim"]
    elif d % heads:
        raise ValueError(f"hidden_size ({d}) is not a multiple of num_attention_heads ({heads})")
    else:
        kwargs["key_size"] = d // heads
    if "widening_factor" in data:
        kwargs["widening_factor"] = data["widening_factor"]
    else:
        if not isinstance(data["intermediate_size"], int):
            raise ValueError(f"intermediate_size must be an integer, got {data['intermediate_size']!r}")
        kwargs["widening_factor"] = _widening_factor(d, data["intermediate_size"])
    want_ffn = ffn_size(d, kwargs["widening_factor"])
    if "intermediate_size" in data and data["intermediate_size"] != want_ffn:
        raise ValueError(f"intermediate_size {data['intermediate_size']} disagrees with widening_factor "
                         f"{kwargs['widening_factor']} (which gives {want_ffn})")
    if not isinstance(kwargs["key_size"], int) or kwargs["key_size"] <= 0:
        raise ValueError(f"head_dim must be a positive integer, got {kwargs['key_size']!r}")
    kwargs["int8_row_blocks"] = _row_blocks(heads * kwargs["key_size"], want_ffn)
    for name, value in kwargs.items():  # JSON true would pass as the integer 1
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"Grok1Config.{name} must be a finite number, got {value!r}")
    return Grok1Config(**kwargs)


def config_for_hf(path: Path) -> Grok1Config:
    """A Hugging Face checkpoint directory's config.json -> Grok1Config, or ValueError naming the key."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file}: missing; a Hugging Face checkpoint needs its config.json") from None
    except ValueError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):  # every config problem is a ValueError to callers
        raise ValueError(f"{file}: expected a JSON object")  # noqa: TRY004
    try:
        return _config_from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{file}: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# tensors


def _weight_map(path: Path) -> dict[str, Path]:
    """HF tensor name -> shard file; safetensors win when both kinds are present, as in transformers."""
    for index_name, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({exc})") from None
            return {name: path / file for name, file in weight_map.items()}
        files = sorted(path.glob(pattern))
        if files:
            found: dict[str, Path] = {}
            for file in files:
                for name in _names_in(file):
                    if name in found:
                        raise CheckpointError(f"{path}: {name} is in both {found[name].name} and {file.name}")
                    found[name] = file
            return found
    raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin files")


def _names_in(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        with ExitStack() as stack:
            return list(_open_safetensors(file, stack).keys())
    return list(_load_bin(file))


def _open_safetensors(file: Path, stack: ExitStack):
    from safetensors import SafetensorError, safe_open

    try:
        return stack.enter_context(safe_open(file, "pt"))  # reads the header only; tensors on demand
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing shard") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def _load_bin(file: Path) -> dict:
    # weights_only: tensors and plain containers only, so a checkpoint cannot run code; mmap: nothing is
    # read until a tensor is used.
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing shard") from None
    # UnpicklingError: a foreign object; RuntimeError: not a torch zip archive (mmap needs one); the rest:
    # truncated or corrupt files.
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{file}: cannot load as a weights-only torch checkpoint: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state dict)")
    return state


class _Shards:
    """Opens each shard once (safetensors handles, mmapped .bin state dicts) and reads tensors by name."""

    def __init__(self, weight_map: dict[str, Path], stack: ExitStack):
        self.weight_map, self.stack, self.open = weight_map, stack, {}

    def get(self, name: str) -> tuple[np.ndarray, Path]:
        file = self.weight_map[name]
        if file not in self.open:
            if file.suffix == ".safetensors":
                handle = _open_safetensors(file, self.stack)
                self.open[file] = (handle.get_tensor, frozenset(handle.keys()))
            else:
                state = _load_bin(file)
                self.open[file] = (state.__getitem__, frozenset(state))
        read, stored = self.open[file]
        if name not in stored:  # an index may name a tensor its shard lacks
            raise CheckpointError(f"{file}: {name} is listed in the index but not stored in this shard")
        return _to_numpy(read(name), name, file), file


def _to_numpy(tensor: torch.Tensor, name: str, file: Path) -> np.ndarray:
    tensor = tensor.detach()  # a saved nn.Parameter loads with requires_grad
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes'
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if tensor.dtype in (torch.float32, torch.float16):
        return tensor.numpy()
    raise CheckpointError(f"{file}: {name} is {tensor.dtype}, expected float32, bfloat16 or float16")


def _detect_layout(names, path: Path) -> Layout:
    for layout in LAYOUTS:
        if layout.embedding in names:
            return layout
    raise CheckpointError(f"{path}: not a known Grok-1 Hugging Face layout (no "
                          f"{' or '.join(layout.embedding for layout in LAYOUTS)})")


@dataclass(frozen=True)
class _Param:
    release: str
    sources: tuple[str, ...]  # one HF name, or one per expert in expert order
    rule: Rule


def _plan(layout: Layout, config: Grok1Config) -> list[_Param]:
    """Every release parameter with the HF tensors it is made of, layer by layer."""
    top = [r for r in layout.rules if "{i}" not in r.release]
    per_layer = [r for r in layout.rules if "{i}" in r.release]
    plan = [_Param(r.release, (r.hf,), r) for r in top]
    for i in range(config.num_layers):
        for r in per_layer:
            experts = range(config.num_experts) if r.per_expert else [None]
            plan.append(_Param(r.release.format(i=i), tuple(r.hf.format(i=i, e=e) for e in experts), r))
    return plan


def _hf_shape(param: _Param, config: Grok1Config) -> tuple[int, ...]:
    shape = release_shape(param.release, config)[0]
    if param.rule.per_expert:
        shape = shape[1:]  # one expert of [E, in, out]
    return shape[::-1] if param.rule.transpose else shape


def _check_names(plan: list[_Param], names, path: Path) -> None:
    expected = {s for p in plan for s in p.sources}
    for name in (s for p in plan for s in p.sources):
        if name not in names:
            raise CheckpointError(f"{path}: {name} is missing from the checkpoint")
    for name in sorted(names):
        if name not in expected and name != TIED_HEAD and not _IGNORED.search(name):
            raise CheckpointError(f"{path}: unexpected tensor {name} (not part of Grok-1 in this layout and "
                                  f"config: {len(expected)} tensors expected)")


def _check_tied_head(shards: _Shards, embedding_name: str) -> None:
    head, head_file = shards.get(TIED_HEAD)
    embed, _ = shards.get(embedding_name)
    if head.shape != embed.shape:
        raise CheckpointError(f"{head_file}: {TIED_HEAD} has shape {head.shape}, but Grok-1 ties it to "
                              f"{embedding_name} of shape {embed.shape}")
    for start in range(0, head.shape[0], 4096):  # compared in row blocks: never two float32 copies at once
        a, b = head[start:start + 4096], embed[start:start + 4096]
        if not np.array_equal(a.astype(np.float32), b.astype(np.float32)):
            raise CheckpointError(f"{head_file}: {TIED_HEAD} differs from {embedding_name}; Grok-1 ties its "
                                  f"output projection to the embedding, so an untied head cannot be served")


def _read_param(shards: _Shards, param: _Param, config: Grok1Config) -> tuple[np.ndarray, Path]:
    want = _hf_shape(param, config)
    out, file = None, None
    for e, name in enumerate(param.sources):
        array, file = shards.get(name)
        if tuple(array.shape) != tuple(want):
            raise CheckpointError(f"{file}: {name} has shape {tuple(array.shape)}, expected {tuple(want)} "
                                  f"for this config")
        array = array.T if param.rule.transpose else array  # a view; assign copies it contiguous
        if not param.rule.per_expert:
            return array, file
        if out is None:  # [E, in, out], filled expert by expert so only one stacked copy exists
            out = np.empty((len(param.sources), *array.shape), array.dtype)
        elif array.dtype != out.dtype:
            raise CheckpointError(f"{file}: {name} is {array.dtype}, other experts of {param.release} are "
                                  f"{out.dtype}")
        out[e] = array
    return out, file


def iter_hf(path: Path, config: Grok1Config) -> Iterator[tuple[str, np.ndarray, Path, bool]]:
    """(release name, full float array in the release's layout, source file, False), one parameter at a time.

    Names are checked before anything is yielded: a missing or unknown tensor fails the load up front."""
    path = Path(path)
    weight_map = _weight_map(path)
    layout = _detect_layout(weight_map, path)
    plan = _plan(layout, config)
    _check_names(plan, weight_map, path)
    with ExitStack() as stack:
        shards = _Shards(weight_map, stack)
        if TIED_HEAD in weight_map:
            _check_tied_head(shards, layout.embedding)
        for param in plan:
            array, file = _read_param(shards, param, config)
            yield param.release, array, file, False
