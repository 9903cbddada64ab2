"""What keeping the residual stream in float32 costs: one model, both settings, forward passes
alternating in one process so that both see the same machine state.

    python scripts/bench_residual.py [--model cpu-bench] [--dtype bfloat16] [--tokens 1,64] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.model import load_model
from services.model.attention_metadata import AttentionMetadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cpu-bench")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", default="1,64", help="tokens per forward pass")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    model = load_model(args.model, args.dtype)
    block_size = 16
    print(f"{args.model} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median ms per forward pass of {args.reps} alternating runs")
    for tokens in (int(t) for t in args.tokens.split(",")):
        blocks = -(-tokens // block_size)
        kv, table = model.allocate_kv_cache(blocks, block_size), torch.arange(blocks)
        meta = AttentionMetadata.for_single_sequence(0, tokens, table, block_size)
        ids, positions = torch.arange(3, 3 + tokens), torch.arange(tokens)
        times = {torch.float32: [], model.dtype: []}
        with torch.inference_mode():
            for _ in range(args.reps + 1):
                for residual, samples in times.items():
                    model.residual_dtype = residual
                    start = time.perf_counter()
                    model.compute_logits(model.forward(ids, positions, kv, meta, count_experts=False)[-1:])
                    samples.append(time.perf_counter() - start)
        row = ", ".join(f"residual {str(r).removeprefix('torch.')}: {statistics.median(t[1:]) * 1e3:.1f}"
                        for r, t in times.items())
        print(f"  {tokens} tokens: {row}", flush=True)


if __name__ == "__main__":
    main()
