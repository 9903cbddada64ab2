"""Tile configurations as data: the shipped files parse, cover the shapes, and select sanely."""
from __future__ import annotations

import json

import pytest
import torch

from kernels import tile_config
from kernels.tile_config import (
    CONFIG_DIR,
    GemmTiles,
    MoeTileConfig,
    config_file_name,
    format_config_file,
    load_tile_configs,
    parse_config_file,
    select_tile_config,
)

GROK1_SHAPES = [(8 // ep, 6144, 32768) for ep in (1, 2, 4, 8)]
TINY_SHAPES = [(8, 64, 176), (8, 128, 344), (8, 1024, 2048)]  # tiny preset, reference tiny, cpu-bench


@pytest.mark.parametrize("shape", GROK1_SHAPES + TINY_SHAPES)
def test_shipped_config_covers_shape(shape):
    configs = load_tile_configs(*shape)
    assert {"int8", "bf16"} <= set(configs)
    for kind, buckets in configs.items():
        assert 1 in buckets and max(buckets) >= 1024, kind
        for config in buckets.values():
            assert config.gate_up.split_k == 1  # GEMM 1 has no split-K
            assert config.block_m <= 128


def test_every_shipped_file_is_well_formed():
    files = sorted(CONFIG_DIR.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        shape = data["shape"]
        assert path.name.startswith(config_file_name(shape["local_experts"], shape["hidden"], shape["ffn"])[:-5])
        parse_config_file(data)


def test_nearest_bucket_wins(tmp_path):
    small = MoeTileConfig(16, GemmTiles(64, 128), GemmTiles(64, 128, split_k=4))
    large = MoeTileConfig(64, GemmTiles(128, 64, 8), GemmTiles(128, 64, 8))
    header = {"shape": {"local_experts": 3, "hidden": 96, "ffn": 80}, "device": None, "tuned": False}
    (tmp_path / config_file_name(3, 96, 80)).write_text(format_config_file(header, {"int8": {1: small, 512: large}}))

    def pick(num_tokens, dtype=torch.int8, device=None):
        return select_tile_config(num_tokens, 3, 96, 80, dtype, device, tmp_path)

    assert pick(1) == small and pick(200) == small and pick(300) == large and pick(10_000) == large
    # No bf16 entry in the file: the built-in default applies.
    assert pick(1, torch.bfloat16) == tile_config.default_tile_config(1, torch.bfloat16)
    # A device's own file beats the generic one.
    tuned = MoeTileConfig(32, GemmTiles(32, 64), GemmTiles(32, 64))
    (tmp_path / config_file_name(3, 96, 80, "NVIDIA H100 80GB HBM3")).write_text(
        format_config_file({**header, "device": "NVIDIA H100 80GB HBM3", "tuned": True}, {"int8": {1: tuned}}))
    assert pick(7, device="NVIDIA H100 80GB HBM3") != small
    assert pick(7, device="NVIDIA H100 80GB HBM3") == tuned
    assert pick(7, device="Other GPU") == small
    # ... for the weight kinds it holds: the rest keep the generic file's configs.
    bf16 = MoeTileConfig(16, GemmTiles(128, 64), GemmTiles(128, 64))
    tile_config.load_tile_configs.cache_clear()
    (tmp_path / config_file_name(3, 96, 80)).write_text(
        format_config_file(header, {"int8": {1: small, 512: large}, "bf16": {1: bf16}}))
    assert pick(7, torch.bfloat16, device="NVIDIA H100 80GB HBM3") == bf16
    assert pick(7, device="NVIDIA H100 80GB HBM3") == tuned


def test_format_round_trips():
    configs = load_tile_configs(8, 6144, 32768)
    assert parse_config_file(json.loads(format_config_file({"device": None}, configs))) == configs


@pytest.mark.parametrize("bad", [
    lambda: GemmTiles(48, 64), lambda: GemmTiles(64, 8), lambda: GemmTiles(64, 64, split_k=3),
    lambda: MoeTileConfig(8, GemmTiles(64, 64), GemmTiles(64, 64)),
])
def test_invalid_tiles_are_rejected(bad):
    with pytest.raises(ValueError):
        bad()


def test_autotune_refuses_to_run_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: autotune would run for real")
    from kernels import autotune

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        autotune.main(["--shapes", "tiny"])
