"""Checkpoint loaders: release pickles of any shape, safetensors conversion, and bad checkpoints."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from services.model import load_model
from services.model.checkpoint import assign, dummy_weights
from services.model.config import Grok1Config
from services.model.convert import convert_release
from services.model.grok1 import Grok1
from services.model.release_format import CheckpointError, param_names, read_tensor, tensor_path
from tests.release_writer import write_release

# 11 layers: lexicographic file order (0, 1, 10, 2, ...) differs from numeric order.
ODD = Grok1Config(vocab_size=300, emb_size=48, key_size=8, num_q_heads=6, num_kv_heads=3, num_layers=11,
                  widening_factor=2.0, int8_row_blocks=4, max_seq_len=64, attn_output_multiplier=0.35,
                  embedding_multiplier_scale=3.0)
SMALL = Grok1Config(vocab_size=280, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=1, num_layers=2,
                    widening_factor=3.0, int8_row_blocks=2, max_seq_len=64)


def reference_model(config: Grok1Config, seed: int) -> Grok1:
    model = Grok1(config)
    with torch.no_grad():
        for name, value, source, sliced in dummy_weights(config, seed):
            assign(model, name, value, source, sliced)
    model.store_experts_out_in()  # as load_model does on CPU, so that logits compare bit for bit
    return model.eval()


def assert_same_model(a: Grok1, b: Grok1) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("config", [ODD, SMALL], ids=["11-layers-rowblocks4", "1-kv-head-rowblocks2"])
def test_release_format_loads_what_was_written(tmp_path, config):
    root = write_release(tmp_path / "ckpt", config, seed=3)
    loaded = load_model(root)
    assert loaded.config == config
    expected = reference_model(config, seed=3)
    assert_same_model(loaded, expected)
    ids = np.arange(1, 20) * 7 % config.vocab_size
    np.testing.assert_array_equal(loaded.score(ids), expected.score(ids))


def test_file_order_is_lexicographic_in_layers():
    names = param_names(ODD)
    layers = [n.split("/")[1] for n in names if n.startswith("transformer/")]
    order = list(dict.fromkeys(layers))
    assert order[:4] == ["decoder_layer_0", "decoder_layer_1", "decoder_layer_10", "decoder_layer_2"]


def test_reference_tensor_names_derived(tiny_reference):
    lines = (tiny_reference / "tensor_names.txt").read_text().splitlines()
    names = [line.strip().removeprefix("params/") for line in lines]
    assert param_names(Grok1Config.from_dir(tiny_reference)) == names


def test_directory_without_config_is_grok1(tmp_path):
    assert Grok1Config.from_dir(tmp_path).num_layers == 64


def test_int8_kept_in_memory_matches_dequantized(tmp_path):
    root = write_release(tmp_path / "ckpt", SMALL, seed=1)
    dense, int8 = load_model(root), load_model(root, int8=True)
    assert int8.decoder_layer[0].moe.linear_1.w.dtype == torch.int8
    assert int8.decoder_layer[0].multi_head_attention.linear.scales.shape == (2, SMALL.emb_size)
    ids = [1, 5, 9, 13]
    np.testing.assert_allclose(int8.score(ids), dense.score(ids), atol=1e-5)


def test_convert_to_safetensors_loads_identically(tmp_path):
    root = write_release(tmp_path / "ckpt", ODD, seed=5)
    out = tmp_path / "st"
    info = convert_release(root, out, shard_bytes=200_000)
    assert info["shards"] > 1
    assert_same_model(load_model(out), load_model(root))
    assert not any(p.suffix == ".pkl" for p in out.iterdir())


def test_convert_reference_checkpoint(tmp_path, tiny_reference):
    out = tmp_path / "st"
    convert_release(tiny_reference, out)
    assert_same_model(load_model(out), load_model(tiny_reference))


def test_dummy_weights_are_deterministic():
    a, b, c = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    assert_same_model(a, b)
    assert not torch.equal(a.decoder_layer[0].router.w, c.decoder_layer[0].router.w)


# Bad checkpoints: one clear error line each, naming the file.

@pytest.fixture()
def small_ckpt(tmp_path):
    return write_release(tmp_path / "ckpt", SMALL, seed=0)


def load_error(root) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(root)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(small_ckpt):
    os.remove(tensor_path(small_ckpt, 7))
    message = load_error(small_ckpt)
    assert "tensor00007_000" in message and "missing" in message


def test_truncated_pickle(small_ckpt):
    path = tensor_path(small_ckpt, 2)
    path.write_bytes(path.read_bytes()[:1000])
    message = load_error(small_ckpt)
    assert "tensor00002_000" in message and "truncated" in message


def test_wrong_shape(small_ckpt):
    path = tensor_path(small_ckpt, 13)  # router of layer 0
    value = read_tensor(path)
    from services.model.release_format import write_tensor
    write_tensor(path, value[:, :3])
    message = load_error(small_ckpt)
    assert "tensor00013_000" in message and "router" in message and "expected" in message


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_code_in_pickle_is_refused_and_never_runs(small_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tensor_path(small_ckpt, 1), "wb") as f:
        pickle.dump(_Exploit(), f)
    message = load_error(small_ckpt)
    assert "refusing" in message and "system" in message and "tensor00001_000" in message
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_unknown_class_is_refused(small_ckpt):
    with open(tensor_path(small_ckpt, 0), "wb") as f:
        pickle.dump({"weights": np.zeros(3)}, f)  # a dict is no parameter
    assert "tensor00000_000" in load_error(small_ckpt)
    with open(tensor_path(small_ckpt, 0), "wb") as f:
        pickle.dump(shutil.copyfile, f)
    assert "shutil.copyfile" in load_error(small_ckpt)


def test_unknown_preset_and_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        load_model("grok-2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_model(tmp_path / "empty")


def test_expert_storage_is_chosen_apart_from_the_rest():
    ids = np.arange(3, 20)
    plain = load_model("tiny", "float32")
    w8a16 = load_model("tiny", "float32", expert_dtype="int8")
    h200 = load_model("tiny", "float32", int8=True, expert_dtype="bfloat16")
    layer = w8a16.decoder_layer[0]
    assert layer.moe.linear_1.w.dtype == torch.int8 and layer.moe.linear_1.scales.shape[-2] == 8
    assert layer.multi_head_attention.query.w.dtype == torch.float32
    layer = h200.decoder_layer[0]
    assert layer.moe.linear_linear_v.w.dtype == torch.bfloat16 and layer.moe.linear_linear_v.scales is None
    assert layer.multi_head_attention.query.w.dtype == torch.int8
    # int8 experts compute the same float32 sums as experts dequantized at load.
    np.testing.assert_allclose(w8a16.score(ids), plain.score(ids), rtol=0, atol=1e-4)
    assert np.isfinite(h200.score(ids)).all()
    with pytest.raises(ValueError, match="expert_dtype"):
        load_model("tiny", "float32", expert_dtype="int4")


@pytest.mark.parametrize("int8", [True, False])
def test_mapped_release_arrays_load_chunk_by_chunk_into_each_rank(tmp_path, monkeypatch, int8):
    """Every array mapped from its file and copied in chunks of a few rows: the same model, per rank."""
    from services.model import checkpoint, release_format
    from services.model.shard import Shard

    # Arrays over 64 KiB: pickle writes those outside its frames, where they can be mapped.
    config = SMALL.replace(num_kv_heads=2, emb_size=128, widening_factor=6.0)
    root = write_release(tmp_path / "ckpt", config, seed=5)
    expected = [load_model(root, int8=int8, shard=Shard(r, 2)) for r in range(2)]
    monkeypatch.setattr(release_format, "MAP_THRESHOLD", 64)
    monkeypatch.setattr(checkpoint, "COPY_CHUNK_BYTES", 100)
    value = read_tensor(tensor_path(root, param_names(config).index("transformer/decoder_layer_0/moe/linear_1/w")),
                        mapped=True)
    assert isinstance(value.weight, np.memmap)
    for rank in range(2):
        assert_same_model(load_model(root, int8=int8, shard=Shard(rank, 2)), expected[rank])


def test_mapped_reading_refuses_foreign_globals_too(tmp_path):
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps(os.system))
    with pytest.raises(CheckpointError, match="refusing to load global"):
        read_tensor(path, mapped=True)


def test_loading_and_converting_report_bytes_rate_and_time_left(tmp_path, capsys, monkeypatch):
    from services.model import checkpoint

    root = write_release(tmp_path / "ckpt", SMALL, seed=6)
    monkeypatch.setattr(checkpoint.Progress.__init__, "__defaults__", (0.0, 0, None))
    load_model(root)
    convert_release(root, tmp_path / "st")
    err = capsys.readouterr().err
    for verb in ("loading", "converting"):
        lines = [line for line in err.splitlines() if line.startswith(verb)]
        assert lines and " GB/s" in lines[0] and "s left" in lines[0] and "done in" in lines[-1], err
