"""Grok-1's real per-layer shapes on CPU: write, load (per rank), run and convert a release-format
checkpoint with one or more layers of the released dims and a small vocabulary.

    python scripts/real_shapes.py write DIR [--layers 1] [--vocab 1024]
    python scripts/real_shapes.py load DIR [--size 1]     # each rank in a fresh process
    python scripts/real_shapes.py convert DIR DEST        # grok-serve convert, timed

Dims as released (hidden 6144, 48 query / 8 KV heads of 128, 8 experts with ffn 32768, int8 weights
with bfloat16 scales: one scale row for column-parallel weights, 8 row blocks for
multi_head_attention/linear and moe/linear_1). One layer is about 4.9 GB of int8: the weights are
random int8 drawn directly, never a float array of the full size. Loading keeps the int8 weights
(int8=True), which is what a GPU rank keeps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.model import release_format
from services.model.config import PRESETS
from services.model.release_format import QuantizedWeight8bit
from services.model.weight_map import release_shape


def real_config(layers: int, vocab: int):
    return PRESETS["grok-1"].replace(num_layers=layers, vocab_size=vocab)


def write(root: Path, layers: int, vocab: int, seed: int = 0) -> None:
    config = real_config(layers, vocab)
    (root / "ckpt-0").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started, total = time.perf_counter(), 0
    for index, name in enumerate(release_format.param_names(config)):
        shape, scale_shape = release_shape(name, config)
        if scale_shape is None:
            value = (rng.standard_normal(shape, dtype=np.float32) * (1.0 if name.endswith("scale") else 0.02))
        else:
            weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
            fan_in = shape[-2]
            scales = ((0.5 + rng.random(scale_shape, dtype=np.float32)) / (127 * fan_in ** 0.5))
            value = QuantizedWeight8bit(weight, scales.astype(ml_dtypes.bfloat16))
        release_format.write_tensor(release_format.tensor_path(root, index), value)
        total += os.path.getsize(release_format.tensor_path(root, index))
        print(f"  {name}: {shape}, {total / 1e9:.2f} GB written", flush=True)
        del value
    (root / "config.json").write_text(json.dumps(config.to_reference_dict()))
    print(f"wrote {total / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s to {root}")


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rank(root: Path, rank_index: int, size: int) -> dict:
    """One rank's load in this process: bytes kept, resident growth, rate, and a forward pass."""
    import torch

    from services.model import load_model
    from services.model.checkpoint import checkpoint_bytes
    from services.model.shard import Shard

    torch.set_num_threads(max(1, os.cpu_count() // size))
    before = _kib("VmRSS")
    started = time.perf_counter()
    model = load_model(root, "bfloat16", int8=True, shard=Shard(rank_index, size))
    seconds = time.perf_counter() - started
    kept = sum(b.numel() * b.element_size() for b in model.buffers())
    peak = (_kib("VmHWM") - before) * 1024
    out = {"rank": rank_index, "size": size, "load_s": round(seconds, 1), "kept_gb": round(kept / 1e9, 3),
           "peak_rss_growth_gb": round(peak / 1e9, 3), "peak_over_kept": round(peak / kept, 3),
           "checkpoint_gb": round(checkpoint_bytes(root) / 1e9, 3),
           "kept_gb_per_s": round(kept / seconds / 1e9, 2)}
    if size == 1:
        ids = np.arange(3, 11)
        started = time.perf_counter()
        logits = model.score(ids)
        out["forward_8_tokens_s"] = round(time.perf_counter() - started, 1)
        out["logits_finite"] = bool(np.isfinite(logits).all())
    return out


def load(root: Path, size: int) -> None:
    for r in range(size):
        result = subprocess.run([sys.executable, __file__, "_rank", str(root), str(r), str(size)],
                                capture_output=True, text=True, check=False)
        sys.stderr.write(result.stderr)
        if result.returncode:
            sys.exit(f"rank {r} failed ({result.returncode})")
        print(result.stdout.strip().splitlines()[-1], flush=True)


def convert(root: Path, dest: Path) -> None:
    started = time.perf_counter()
    cli = Path(sys.executable).with_name("grok-serve")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "services.cli"]
    result = subprocess.run([*command, "convert", str(root), str(dest)], check=False)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    print(json.dumps({"convert_exit": result.returncode, "seconds": round(seconds, 1),
                      "safetensors_gb": round(size / 1e9, 3), "gb_per_s": round(size / seconds / 1e9, 2),
                      "peak_rss_gb": round(peak / 1e9, 3)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("root", type=Path)
    w.add_argument("--layers", type=int, default=1)
    w.add_argument("--vocab", type=int, default=1024)
    lo = sub.add_parser("load")
    lo.add_argument("root", type=Path)
    lo.add_argument("--size", type=int, default=1)
    c = sub.add_parser("convert")
    c.add_argument("root", type=Path)
    c.add_argument("dest", type=Path)
    r = sub.add_parser("_rank")
    r.add_argument("root", type=Path)
    r.add_argument("rank", type=int)
    r.add_argument("size", type=int)
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.root, args.layers, args.vocab)
    elif args.command == "load":
        load(args.root, args.size)
    elif args.command == "convert":
        convert(args.root, args.dest)
    else:
        print(json.dumps(rank(args.root, args.rank, args.size)))


if __name__ == "__main__":
    main()
