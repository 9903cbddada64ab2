"""python -m kernels.autotune: measure tile configs of the grouped GEMMs on this GPU and write them.

For each shape, weight kind and token bucket it times every candidate of a pruned search space
(GEMM 1 and GEMM 2 separately, over the same routing, for each BLOCK_M), checks the winner against
the torch reference, and writes kernels/configs/e{E}_d{D}_f{F}_{device}.json, which the dispatch
then prefers over the generic file. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from .tile_config import CONFIG_DIR, GemmTiles, MoeTileConfig, config_file_name, format_config_file

# Legend: T = tokens, E = experts (global), L = local experts, D = hidden, F = ffn.

GROK1 = {"hidden": 6144, "ffn": 32768, "num_experts": 8}
SHAPES = {
    **{f"grok1-ep{ep}": {**GROK1, "local": 8 // ep} for ep in (1, 2, 4, 8)},
    "cpu-bench": {"hidden": 1024, "ffn": 2048, "num_experts": 8, "local": 8},
    "tiny": {"hidden": 64, "ffn": 176, "num_experts": 8, "local": 8},
    "reference-tiny": {"hidden": 128, "ffn": 344, "num_experts": 8, "local": 8},
}
BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
WEIGHT_KINDS = {"int8": torch.int8, "bf16": torch.bfloat16}


def block_m_candidates(num_tokens: int, top_k: int, num_local: int) -> list[int]:
    per_expert = max(1, num_tokens * top_k // num_local)
    return [m for m in (16, 32, 64, 128) if m == 16 or m <= 2 * per_expert]


def tile_candidates(block_m: int, n: int, k: int, with_split: bool, full: bool,
                    quick: bool = False) -> list[GemmTiles]:
    """quick: a few minutes per shape on one GPU (the GPU check): one stage count, no 256 tiles."""
    decode = block_m <= 32
    block_ns = [n_ for n_ in ((32, 64, 128) if decode else (64, 128, 256)) if n_ <= max(32, n)]
    block_ks = [k_ for k_ in (64, 128, 256) if k_ <= max(64, k)]
    group_ms = (1,) if decode else (1, 8)
    warps = (4, 8) if full or not decode else (4,)
    stages = (2, 3, 4, 5) if full else (3, 4)
    splits = (1, 2, 4, 8) if with_split and decode else (1,)
    if quick:
        block_ns, block_ks = [n_ for n_ in block_ns if n_ < 256], [k_ for k_ in block_ks if k_ < 256]
        group_ms, warps, stages = group_ms[-1:], warps[-1:], (4,) if decode else (3,)
        splits = (1, 4) if with_split and decode else (1,)
    return [GemmTiles(bn, bk, g, s, w, st)
            for bn, bk, g, s, w, st in itertools.product(block_ns, block_ks, group_ms, splits, warps, stages)]


def time_call(fn) -> float:
    """Median milliseconds, or inf when the config does not compile or launch (shared memory, ...)."""
    import triton.testing
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    try:
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    except (CompilationError, OutOfResources, PTXASError) as exc:  # outside this GPU's limits: no winner
        print(f"    skipped: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        return float("inf")


def random_problem(shape: dict, weight_dtype: torch.dtype, num_tokens: int, seed: int = 0):
    from .dispatch import ExpertWeights

    gen = torch.Generator(device="cuda").manual_seed(seed)
    local, hidden, ffn = shape["local"], shape["hidden"], shape["ffn"]
    kw = {"device": "cuda", "generator": gen}
    if weight_dtype == torch.int8:
        experts = ExpertWeights(
            torch.randint(-127, 128, (local, hidden, 2 * ffn), dtype=torch.int8, **kw),
            torch.randint(-127, 128, (local, ffn, hidden), dtype=torch.int8, **kw),
            (torch.rand(local, 1, 2 * ffn, **kw) / (127 * hidden ** 0.5)).to(torch.bfloat16),
            (torch.rand(local, 8, hidden, **kw) / (127 * ffn ** 0.5)).to(torch.bfloat16))
    else:
        experts = ExpertWeights((torch.randn(local, hidden, 2 * ffn, **kw) * hidden ** -0.5).to(weight_dtype),
                                (torch.randn(local, ffn, hidden, **kw) * ffn ** -0.5).to(weight_dtype))
    x = torch.randn(num_tokens, hidden, **kw).to(torch.bfloat16)
    logits = torch.randn(num_tokens, shape["num_experts"], **kw)
    expert_map = None
    if local < shape["num_experts"]:
        ranks = shape["num_experts"] // local
        ids = torch.arange(shape["num_experts"], device="cuda", dtype=torch.int32)
        expert_map = torch.where(ids % ranks == 0, ids // ranks, -1).to(torch.int32)
        logits += 8.0 * (expert_map >= 0)  # the busiest rank: every token routed here
    return experts, x, logits, expert_map


def tune_bucket(shape: dict, weight_dtype: torch.dtype, num_tokens: int, full: bool,
                quick: bool = False) -> MoeTileConfig:
    from .triton_down import grouped_gemm_down
    from .triton_gate_up import grouped_gemm_gate_up
    from .triton_gating import topk_gating

    experts, x, logits, expert_map = random_problem(shape, weight_dtype, num_tokens)
    num_local = shape["local"] if expert_map is not None else None
    best = (float("inf"), None)
    for block_m in block_m_candidates(num_tokens, 2, shape["local"]):
        routing = topk_gating(logits, 2, block_m, num_local, expert_map)
        h = grouped_gemm_gate_up(x, experts.w13, experts.w13_scales, routing)
        timed_up = [(time_call(lambda c=c, r=routing: grouped_gemm_gate_up(x, experts.w13, experts.w13_scales, r, c)),
                     c) for c in tile_candidates(block_m, shape["ffn"], shape["hidden"], False, full, quick)]
        timed_down = [(time_call(lambda c=c, r=routing, h=h: grouped_gemm_down(h, experts.w2, experts.w2_scales, r, c)),
                       c) for c in tile_candidates(block_m, shape["hidden"], shape["ffn"], True, full, quick)]
        (t_up, up), (t_down, down) = min(timed_up, key=lambda t: t[0]), min(timed_down, key=lambda t: t[0])
        print(f"  T={num_tokens} block_m={block_m}: gate_up {t_up:.3f} ms, down {t_down:.3f} ms", flush=True)
        if t_up + t_down < best[0]:
            best = (t_up + t_down, MoeTileConfig(block_m, up, down))
    check_config(best[1], experts, x, logits, expert_map)
    return best[1]


def check_config(config: MoeTileConfig, experts, x, logits, expert_map) -> None:
    from . import reference
    from .triton_moe import fused_moe_triton

    out = fused_moe_triton(x, logits, experts, 2, expert_map, config=config).float()
    expected = reference.fused_moe(x, logits, experts, 2, expert_map, block_m=config.block_m).float()
    err = ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    if not err < 2e-2:
        raise RuntimeError(f"config {config} disagrees with the reference (relative error {err:.2e})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="grok1-ep1,grok1-ep2,grok1-ep4,grok1-ep8",
                        help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--weights", default="int8,bf16", help="weight kinds: int8,bf16")
    parser.add_argument("--buckets", default=",".join(map(str, BUCKETS)), help="token counts to tune")
    parser.add_argument("--full", action="store_true", help="also try 2 and 5 stages, 8 warps at decode")
    parser.add_argument("--quick", action="store_true", help="a pruned space: one stage count, no 256 tiles")
    parser.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernels.autotune needs a CUDA GPU: it times the Triton kernels on the device it writes for")
    import triton

    device_name = torch.cuda.get_device_name()
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        path = args.out_dir / config_file_name(shape["local"], shape["hidden"], shape["ffn"], device_name)
        header = {"shape": {"local_experts": shape["local"], "hidden": shape["hidden"], "ffn": shape["ffn"]},
                  "device": device_name, "tuned": True,
                  "note": f"python -m kernels.autotune, triton {triton.__version__}, torch {torch.__version__}, "
                          f"{time.strftime('%Y-%m-%d')}"}
        configs: dict[str, dict[int, MoeTileConfig]] = {}
        for kind in args.weights.split(","):
            print(f"{shape_name} {kind} on {device_name}", flush=True)
            for bucket in (int(v) for v in args.buckets.split(",")):
                configs.setdefault(kind, {})[bucket] = tune_bucket(shape, WEIGHT_KINDS[kind], bucket, args.full,
                                                                   args.quick)
                # Written after every bucket: a run cut short keeps what it measured.
                path.write_text(format_config_file(header, configs))
                json.loads(path.read_text())
        print(f"wrote {path}", flush=True)

if __name__ == "__main__":
    main()
