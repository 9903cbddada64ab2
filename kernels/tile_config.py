"""Tile configurations of the grouped GEMMs, kept as data in kernels/configs/*.json.

A file covers one shape (local experts, hidden, ffn) and maps, per weight kind (int8, bf16, fp32),
token-count buckets to a MoeTileConfig; the bucket nearest the call's token count wins. A file
whose name ends in a device name (written by `python -m kernels.autotune` on that GPU) beats the
generic one for the weight kinds it holds. Shapes without a file get default_tile_config.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"

_WEIGHT_KINDS = {torch.int8: "int8", torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    group_m: int = 1
    split_k: int = 1  # GEMM 2 only: programs along K that add into the output
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "group_m", "split_k", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"GemmTiles.{name} must be a power of two >= 1, got {value!r}")
        if self.block_n < 16 or self.block_k < 16:
            raise ValueError(f"GemmTiles block_n/block_k must be >= 16 for tl.dot, got {self}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"GemmTiles.num_stages must be >= 1, got {self.num_stages!r}")


@dataclass(frozen=True)
class MoeTileConfig:
    block_m: int  # shared by both GEMMs: the gating pads each expert's slots to it
    gate_up: GemmTiles
    down: GemmTiles

    def __post_init__(self) -> None:
        if not isinstance(self.block_m, int) or self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"MoeTileConfig.block_m must be a power of two >= 16, got {self.block_m!r}")

    def to_dict(self) -> dict:
        return {"block_m": self.block_m, "gate_up": asdict(self.gate_up), "down": asdict(self.down)}

    @classmethod
    def from_dict(cls, data: dict) -> MoeTileConfig:
        return cls(block_m=data["block_m"], gate_up=GemmTiles(**data["gate_up"]), down=GemmTiles(**data["down"]))


def device_tag(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def weight_kind(weight_dtype: torch.dtype) -> str:
    """Configs key on the bytes a weight streams, not its exact dtype: fp16 tiles like bf16."""
    return _WEIGHT_KINDS[weight_dtype]


def config_file_name(num_local_experts: int, hidden: int, ffn: int, device_name: str | None = None) -> str:
    base = f"e{num_local_experts}_d{hidden}_f{ffn}"
    return f"{base}_{device_tag(device_name)}.json" if device_name else f"{base}.json"


def parse_config_file(data: dict) -> dict[str, dict[int, MoeTileConfig]]:
    """{"configs": {weight kind: {bucket: config}}} -> weight kind -> bucket -> MoeTileConfig."""
    return {kind: {int(bucket): MoeTileConfig.from_dict(cfg) for bucket, cfg in buckets.items()}
            for kind, buckets in data["configs"].items()}


def format_config_file(header: dict, configs: dict[str, dict[int, MoeTileConfig]]) -> str:
    """JSON with one line per bucket, so that a diff of a retuned file reads as a table."""
    lines = ["{"]
    for key, value in header.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "configs": {')
    for k, (kind, buckets) in enumerate(configs.items()):
        lines.append(f"    {json.dumps(kind)}: {{")
        for b, (bucket, config) in enumerate(sorted(buckets.items())):
            comma = "," if b < len(buckets) - 1 else ""
            lines.append(f'      "{bucket}": {json.dumps(config.to_dict())}{comma}')
        lines.append("    }" + ("," if k < len(configs) - 1 else ""))
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


@functools.cache
def load_tile_configs(num_local_experts: int, hidden: int, ffn: int, device_name: str | None = None,
                      config_dir: Path = CONFIG_DIR) -> dict[str, dict[int, MoeTileConfig]]:
    """Weight kind -> bucket -> config for this shape; empty without a file. Read once per process:
    on the hot path a layer must not parse JSON every step."""
    names = [config_file_name(num_local_experts, hidden, ffn)]
    if device_name:
        names.append(config_file_name(num_local_experts, hidden, ffn, device_name))
    merged: dict[str, dict[int, MoeTileConfig]] = {}
    # The device's file over the generic one, weight kind by weight kind: a tuning run that covered
    # only int8 leaves bf16 on the generic configs.
    for name in names:
        path = Path(config_dir) / name
        if path.exists():
            try:
                merged.update(parse_config_file(json.loads(path.read_text())))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: bad tile config ({exc})") from None
    return merged


def default_tile_config(num_tokens: int, weight_dtype: torch.dtype) -> MoeTileConfig:
    """For shapes without a file: decode-sized calls stream weights (narrow N tiles for many programs,
    deep K tiles), large calls are compute-bound (wider tiles, grouped ordering for L2 reuse). Each
    compiles for sm_90 and sm_80 without spills at Grok-1's dims (python -m kernels.aot)."""
    int8 = weight_dtype == torch.int8
    if num_tokens <= 32:
        return MoeTileConfig(16, GemmTiles(64, 128, 1, 1, 4, 4), GemmTiles(64, 128, 1, 1, 4, 4))
    if num_tokens <= 512:
        tiles = GemmTiles(64, 128, 4, 1, 4, 4) if int8 else GemmTiles(128, 64, 4, 1, 4, 4)
        return MoeTileConfig(32, tiles, tiles)
    if int8:
        return MoeTileConfig(64, GemmTiles(64, 64, 8, 1, 8, 4), GemmTiles(64, 128, 8, 1, 8, 4))
    return MoeTileConfig(64, GemmTiles(128, 64, 8, 1, 8, 4), GemmTiles(128, 64, 8, 1, 8, 4))


def interpreter_tile_config(hidden: int, ffn: int, block_m: int = 16, max_block: int = 2048) -> MoeTileConfig:
    """Triton's interpreter runs programs one after another, each op on whole numpy blocks: tiles
    covering all of K and N (up to max_block) mean the fewest programs and loop trips."""
    def tile(n: int) -> int:
        return min(max_block, max(16, _next_power_of_2(n)))

    return MoeTileConfig(block_m, GemmTiles(tile(ffn), tile(hidden)), GemmTiles(tile(hidden), tile(ffn)))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def select_tile_config(num_tokens: int, num_local_experts: int, hidden: int, ffn: int,
                       weight_dtype: torch.dtype, device_name: str | None = None,
                       config_dir: Path = CONFIG_DIR) -> MoeTileConfig:
    configs = load_tile_configs(num_local_experts, hidden, ffn, device_name, config_dir).get(
        weight_kind(weight_dtype))
    if not configs:
        return default_tile_config(num_tokens, weight_dtype)
    bucket = min(configs, key=lambda b: (abs(b - num_tokens), b))
    return configs[bucket]
