"""Hugging Face layouts of Grok-1 (hpcai-tech and keyfan ports): names, transposes, expert stacking, errors.

The HF checkpoints here are written from the release tensors by hand-spelled name functions (not the
loader's table), so a wrong name, a missing transpose or a mis-stacked expert shows up as a model that
differs from the one loaded from the release tensors.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.model import load_model
from services.model.checkpoint import assign, detect_format, dummy_weights
from services.model.config import PRESETS, Grok1Config
from services.model.grok1 import Grok1
from services.model.hf_format import config_for_hf, is_hf_dir, iter_hf
from services.model.quant import dequantize
from services.model.release_format import CheckpointError, QuantizedWeight8bit, param_names

# 11 layers: lexicographic order of names (0, 1, 10, 2, ...) differs from numeric order.
CONFIG = Grok1Config(vocab_size=300, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2, num_layers=11,
                     widening_factor=2.0, int8_row_blocks=2, max_seq_len=64, attn_output_multiplier=0.35,
                     embedding_multiplier_scale=3.0, output_multiplier_scale=0.5)
IDS = np.arange(1, 13) * 7 % CONFIG.vocab_size


def release_floats(config: Grok1Config, seed: int = 0) -> dict[str, np.ndarray]:
    """The dummy release tensors as float32 (as released), int8 ones dequantized exactly as `assign` does."""
    out = {}
    for name, value, _, _ in dummy_weights(config, seed):
        if isinstance(value, QuantizedWeight8bit):
            scales = torch.from_numpy(value.scales.view(np.uint16)).view(torch.bfloat16)
            value = dequantize(torch.from_numpy(value.weight), scales, torch.float32).numpy()
        out[name] = np.asarray(value, np.float32)
    return out


def model_from(tensors: dict[str, np.ndarray], config: Grok1Config = CONFIG) -> Grok1:
    model = Grok1(config)
    with torch.no_grad():
        for name, value in tensors.items():
            assign(model, name, value, "test")
    model.store_experts_out_in()  # as load_model does on CPU, so that logits compare bit for bit
    return model.eval()


def hf_config(config: Grok1Config, layout: str) -> dict:
    common = {
        "vocab_size": config.vocab_size, "hidden_size": config.emb_size, "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_q_heads,
        "num_key_value_heads": config.num_kv_heads, "num_experts_per_tok": config.num_selected_experts,
        "attn_output_multiplier": config.attn_output_multiplier,
        "embedding_multiplier_scale": config.embedding_multiplier_scale,
        "output_multiplier_scale": config.output_multiplier_scale, "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": True,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "use_cache": True,
    }
    if layout == "hpcai":
        return {**common, "architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1",
                "num_experts": config.num_experts, "max_attn_value": 30.0, "router_aux_loss_coef": 0.001}
    return {**common, "architectures": ["GrokForCausalLM"], "model_type": "grok", "hidden_act": "gelu",
            "num_local_experts": config.num_experts, "rope_theta": 10000.0, "attention_dropout": 0.0}


def hf_tensors(release: dict[str, np.ndarray], config: Grok1Config, layout: str) -> dict[str, np.ndarray]:
    """The release tensors under one port's names, as nn.Linear [out, in], experts split."""
    def linear(w):  # release [in, out] -> [out, in]
        return np.ascontiguousarray(w.T)

    if layout == "hpcai":
        out = {"model.embed_tokens.weight": release["language_model/in_out_embed/embeddings"],
               "model.norm.scale": release["language_model/rms_norm/scale"]}
        attn = {"query": "attn.q_proj", "key": "attn.k_proj", "value": "attn.v_proj", "linear": "attn.o_proj"}
        norms = {"rms_norm": "pre_attn_norm.scale", "rms_norm_1": "post_attn_norm.scale",
                 "rms_norm_2": "pre_moe_norm.scale", "rms_norm_3": "post_moe_norm.scale"}
        prefix, router = "model.layers.{i}.", "moe_block.gate.weight"
        expert = "moe_block.experts.{e}.{p}.weight"
    else:
        out = {"transformer.in_out_embed.weight": release["language_model/in_out_embed/embeddings"],
               "transformer.rms_norm.weight": release["language_model/rms_norm/scale"]}
        attn = {p: f"multi_head_attention.{p}" for p in ("query", "key", "value", "linear")}
        norms = {p: f"{p}.weight" for p in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3")}
        prefix, router, expert = "transformer.decoder_layer.{i}.", "router.weight", "moe.{e}.{p}.weight"
    for i in range(config.num_layers):
        src, dst = f"transformer/decoder_layer_{i}/", prefix.format(i=i)
        for p, hf in attn.items():
            out[dst + hf + ".weight"] = linear(release[src + f"multi_head_attention/{p}/w"])
        for p, hf in norms.items():
            out[dst + hf] = release[src + f"{p}/scale"]
        out[dst + router] = linear(release[src + "router/w"])
        for p in ("linear", "linear_v", "linear_1"):
            for e in range(config.num_experts):
                out[dst + expert.format(e=e, p=p)] = linear(release[src + f"moe/{p}/w"][e])
    return out


def as_torch(tensors: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in tensors.items()}


def write_hf(root: Path, tensors: dict[str, torch.Tensor], config_json: dict, storage: str,
             shards: int = 3) -> Path:
    """safetensors or .bin, sharded with an index, or one file without."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config_json))
    kind, sharded = storage.split("-")
    names = sorted(tensors)
    n = shards if sharded == "index" else 1
    groups = [names[k::n] for k in range(n)]  # interleaved, so a layer's experts span shards
    weight_map = {}
    for k, group in enumerate(groups):
        part = {name: tensors[name] for name in group}
        if kind == "safetensors":
            file = f"model-{k + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            save_file(part, str(root / file))
        else:
            file = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin" if n > 1 else "pytorch_model.bin"
            torch.save(part, root / file)
        weight_map.update(dict.fromkeys(group, file))
    if n > 1:
        index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.fixture(scope="module")
def release() -> dict[str, np.ndarray]:
    return release_floats(CONFIG, seed=5)


@pytest.fixture(scope="module")
def expected(release) -> Grok1:
    return model_from(release)


def assert_same_model(a: Grok1, b: Grok1) -> None:
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for key, value in ba.items():
        assert torch.equal(value, bb[key]), key


def error_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


STORAGES = ["safetensors-index", "safetensors-single", "bin-index", "bin-single"]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("layout", ["hpcai", "keyfan"])
def test_hf_layout_loads_the_release_weights(tmp_path, release, expected, layout, storage):
    root = write_hf(tmp_path / "hf", as_torch(hf_tensors(release, CONFIG, layout), torch.float32),
                    hf_config(CONFIG, layout), storage)
    assert is_hf_dir(root) and detect_format(root) == "hf"
    loaded = load_model(root)
    # HF configs say intermediate_size, not the widening factor, and carry no int8 row blocks (float weights).
    assert loaded.config.ffn_size == CONFIG.ffn_size
    assert loaded.config.replace(widening_factor=CONFIG.widening_factor, int8_row_blocks=2) == CONFIG
    assert_same_model(loaded, expected)
    np.testing.assert_array_equal(loaded.score(IDS), expected.score(IDS))


@pytest.mark.parametrize("layout", ["hpcai", "keyfan"])
def test_every_release_parameter_is_yielded_once_in_release_layout(tmp_path, release, layout):
    root = write_hf(tmp_path / "hf", as_torch(hf_tensors(release, CONFIG, layout), torch.float32),
                    hf_config(CONFIG, layout), "safetensors-index")
    seen = []
    for name, array, file, sliced in iter_hf(root, CONFIG):
        assert not sliced and Path(file).parent == root
        np.testing.assert_array_equal(array, release[name], err_msg=name)
        seen.append(name)
    assert sorted(seen) == param_names(CONFIG)


@pytest.mark.parametrize("storage", ["safetensors-index", "bin-index"])
def test_bfloat16_tensors_load_bit_exact(tmp_path, release, storage):
    root = write_hf(tmp_path / "hf", as_torch(hf_tensors(release, CONFIG, "hpcai"), torch.bfloat16),
                    hf_config(CONFIG, "hpcai"), storage)
    rounded = {k: v.astype(ml_dtypes.bfloat16) for k, v in release.items()}
    expected = model_from(rounded)
    assert_same_model(load_model(root, load_format="hf"), expected)


def test_float16_tensors_load(tmp_path, release):
    root = write_hf(tmp_path / "hf", as_torch(hf_tensors(release, CONFIG, "keyfan"), torch.float16),
                    hf_config(CONFIG, "keyfan"), "safetensors-single")
    expected = model_from({k: v.astype(np.float16) for k, v in release.items()})
    assert_same_model(load_model(root), expected)


@pytest.mark.parametrize("layout", ["hpcai", "keyfan"])
def test_tied_lm_head_and_rotary_buffers_are_accepted(tmp_path, release, expected, layout):
    tensors = hf_tensors(release, CONFIG, layout)
    embedding = "model.embed_tokens.weight" if layout == "hpcai" else "transformer.in_out_embed.weight"
    tensors["lm_head.weight"] = tensors[embedding].copy()
    attention = {"hpcai": "model.layers.3.attn.",
                 "keyfan": "transformer.decoder_layer.3.multi_head_attention."}[layout]
    tensors[attention + "rotary_emb.inv_freq"] = np.ones(CONFIG.key_size // 2, np.float32)
    root = write_hf(tmp_path / "hf", as_torch(tensors, torch.float32), hf_config(CONFIG, layout), "bin-index")
    assert_same_model(load_model(root), expected)


def test_untied_lm_head_is_refused(tmp_path, release):
    tensors = hf_tensors(release, CONFIG, "hpcai")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 2
    root = write_hf(tmp_path / "hf", as_torch(tensors, torch.float32), hf_config(CONFIG, "hpcai"),
                    "safetensors-index")
    with pytest.raises(CheckpointError) as excinfo:
        load_model(root)
    assert "lm_head.weight differs from model.embed_tokens.weight" in error_line(excinfo)


def broken(release, layout, change) -> dict[str, torch.Tensor]:
    tensors = as_torch(hf_tensors(release, CONFIG, layout), torch.float32)
    change(tensors)
    return tensors


@pytest.mark.parametrize("layout,name", [
    ("hpcai", "model.layers.10.moe_block.experts.7.linear_v.weight"),
    ("keyfan", "transformer.decoder_layer.2.rms_norm_3.weight"),
])
def test_missing_tensor_names_it_and_the_directory(tmp_path, release, layout, name):
    tensors = broken(release, layout, lambda t: t.pop(name))
    root = write_hf(tmp_path / "hf", tensors, hf_config(CONFIG, layout), "safetensors-index")
    with pytest.raises(CheckpointError) as excinfo:
        load_model(root)
    message = error_line(excinfo)
    assert name in message and str(root) in message and "missing" in message


@pytest.mark.parametrize("layout,name", [
    ("hpcai", "model.layers.4.attn.k_proj.weight"),
    ("keyfan", "transformer.decoder_layer.9.moe.3.linear_1.weight"),
])
def test_wrong_shape_names_the_tensor(tmp_path, release, layout, name):
    def transpose(t):
        t[name] = t[name].T.contiguous()  # the release's [in, out], not nn.Linear's [out, in]

    tensors = broken(release, layout, transpose)
    root = write_hf(tmp_path / "hf", tensors, hf_config(CONFIG, layout), "bin-index")
    with pytest.raises(CheckpointError) as excinfo:
        load_model(root)
    message = error_line(excinfo)
    assert name in message and "shape" in message


@pytest.mark.parametrize("layout,name", [
    ("hpcai", "model.layers.11.attn.q_proj.weight"),  # one layer more than the config
    ("keyfan", "transformer.decoder_layer.0.moe.8.linear.weight"),  # a ninth expert
    ("hpcai", "model.layers.0.mlp.up_proj.weight"),
])
def test_unknown_tensor_names_it(tmp_path, release, layout, name):
    def add(t):
        t[name] = torch.zeros(3, 3)

    tensors = broken(release, layout, add)
    root = write_hf(tmp_path / "hf", tensors, hf_config(CONFIG, layout), "safetensors-single")
    with pytest.raises(CheckpointError) as excinfo:
        load_model(root)
    message = error_line(excinfo)
    assert name in message and "unexpected" in message


@pytest.mark.parametrize("storage", ["safetensors-index", "bin-index"])
def test_index_naming_a_tensor_its_shard_lacks(tmp_path, release, storage):
    root = write_hf(tmp_path / "hf", as_torch(hf_tensors(release, CONFIG, "keyfan"), torch.float32),
                    hf_config(CONFIG, "keyfan"), storage)
    index_file = next(root.glob("*.index.json"))
    index = json.loads(index_file.read_text())
    name = "transformer.decoder_layer.5.router.weight"
    index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values()))
                                     if f != index["weight_map"][name])
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as excinfo:
        load_model(root)
    assert f"{name} is listed in the index but not stored in this shard" in error_line(excinfo)


def test_pickled_objects_are_refused_without_running_them(tmp_path, release):
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    root = write_hf(tmp_path / "hf", as_torch(hf_tensors(release, CONFIG, "hpcai"), torch.float32),
                    hf_config(CONFIG, "hpcai"), "bin-single")
    with open(root / "pytorch_model.bin", "wb") as f:  # a plain pickle, not even a torch zip archive
        pickle.dump({"model.embed_tokens.weight": Payload()}, f)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(root)
    assert "pytorch_model.bin" in error_line(excinfo)
    assert not ran.exists()


def test_integer_tensors_are_refused(tmp_path, release):
    def quantize(t):
        t["model.norm.scale"] = t["model.norm.scale"].to(torch.int8)

    root = write_hf(tmp_path / "hf", broken(release, "hpcai", quantize), hf_config(CONFIG, "hpcai"),
                    "safetensors-single")
    with pytest.raises(CheckpointError) as excinfo:
        load_model(root)
    assert "model.norm.scale is torch.int8" in error_line(excinfo)


# --- config.json -----------------------------------------------------------------------------------

HPCAI_GROK1 = {  # hpcai-tech/grok-1's configuration defaults
    "architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1", "vocab_size": 131072,
    "hidden_size": 6144, "intermediate_size": 32768, "num_hidden_layers": 64, "num_attention_heads": 48,
    "num_key_value_heads": 8, "attn_output_multiplier": 0.08838834764831845,
    "embedding_multiplier_scale": 78.38367176906169, "output_multiplier_scale": 0.5773502691896257,
    "max_attn_value": 30.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "use_cache": True,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True,
    "num_experts_per_tok": 2, "num_experts": 8, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    "torch_dtype": "bfloat16",
}
KEYFAN_GROK1 = {  # keyfan/grok-1-hf's naming: Mixtral-style expert count, rope_theta, hidden_act
    **{k: v for k, v in HPCAI_GROK1.items() if k not in ("num_experts", "max_attn_value")},
    "architectures": ["GrokForCausalLM"], "model_type": "grok", "num_local_experts": 8, "rope_theta": 10000.0,
    "hidden_act": "gelu", "attention_dropout": 0.0, "initializer_range": 0.02,
}


def write_config(tmp_path: Path, data: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("data", [HPCAI_GROK1, KEYFAN_GROK1], ids=["hpcai", "keyfan"])
def test_grok1_configs_map_to_the_release_config(tmp_path, data):
    assert config_for_hf(write_config(tmp_path, data)) == PRESETS["grok-1"]


@pytest.mark.parametrize("change,words", [
    ({"max_attn_value": 20.0}, "max_attn_value=20.0 is not supported"),
    ({"router_logit_softcapping": 30.0}, "router_logit_softcapping=30.0 is not supported"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
    ({"hidden_act": "silu"}, "hidden_act='silu' is not supported"),
    ({"residual_moe": True}, "residual_moe=True is not supported"),
    ({"hidden_size": None}, "missing keys: hidden_size"),
    ({"num_experts": None}, "missing keys: num_experts or num_local_experts"),
    ({"num_local_experts": 4}, "num_experts and num_local_experts disagree"),
    ({"intermediate_size": 32769}, "intermediate_size 32769"),
    ({"num_attention_heads": 47}, "not a multiple of num_attention_heads"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "is not a Grok-1 port"),
    ({"num_hidden_layers": 0}, "num_layers must be a positive integer"),
])
def test_config_errors_name_the_key(tmp_path, change, words):
    data = {k: v for k, v in {**HPCAI_GROK1, **change}.items() if v is not None}
    with pytest.raises(ValueError) as excinfo:
        config_for_hf(write_config(tmp_path, data))
    message = error_line(excinfo)
    assert words in message and "config.json" in message


def test_is_hf_dir_tells_transformers_configs_from_reference_ones(tmp_path):
    assert is_hf_dir(write_config(tmp_path / "hf", HPCAI_GROK1))
    assert not is_hf_dir(write_config(tmp_path / "ref", CONFIG.to_reference_dict()))
    assert not is_hf_dir(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert not is_hf_dir(tmp_path / "bad")
