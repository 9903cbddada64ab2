from __future__ import annotations

import json

import pytest

from services.model.config import PRESETS, Grok1Config, ffn_size, get_preset


def test_grok1_preset_is_the_release():
    c = PRESETS["grok-1"]
    assert (c.num_layers, c.emb_size, c.num_q_heads, c.num_kv_heads, c.key_size) == (64, 6144, 48, 8, 128)
    assert (c.ffn_size, c.num_experts, c.num_selected_experts, c.vocab_size) == (32768, 8, 2, 131072)
    assert (c.max_seq_len, c.pad_token_id, c.eos_token_id) == (8192, 0, 2)
    assert round(c.attn_output_multiplier, 7) == 0.0883883
    assert round(c.embedding_multiplier_scale, 5) == 78.38367
    assert round(c.output_multiplier_scale, 7) == 0.5773503
    assert 310e9 < c.num_parameters < 320e9  # "314B parameters"


def test_reference_config_json(tiny_reference):
    data = json.loads((tiny_reference / "config.json").read_text())
    c = Grok1Config.from_dir(tiny_reference)
    assert c.ffn_size == data["ffn_size"] == ffn_size(data["emb_size"], data["widening_factor"])
    assert c.to_reference_dict() == {**data}


@pytest.mark.parametrize("changes, message", [
    ({"num_q_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
    ({"num_selected_experts": 9}, "num_selected_experts"),
    ({"key_size": 7}, "even"),
    ({"emb_size": 0}, "positive integer"),
    ({"eos_token_id": 10**6}, "outside the vocabulary"),
    ({"attn_logit_softcap": float("nan")}, "finite"),
    ({"int8_row_blocks": 7}, "int8_row_blocks"),
])
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        PRESETS["tiny"].replace(**changes)


def test_bad_config_file(tmp_path):
    (tmp_path / "config.json").write_text('{"emb_size": 64, "colour": "blue"}')
    with pytest.raises(ValueError, match="colour"):
        Grok1Config.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Grok1Config.from_dir(tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="cpu-bench"):
        get_preset("huge")
