"""Decode attention over the paged cache, per layer: the compiled kernel (kernels/csrc/decode_attention.cpp)
against the torch path it replaces, alternating in one process on the same inputs.

    python scripts/bench_decode_attention.py [--dtype bfloat16] [--heads 8] [--groups 2] [--head-size 64]

cpu-bench's attention shape by default (8 kv heads, 2 q heads each, head size 64, blocks of 16),
B sequences of L tokens each, blocks scattered over the cache.
"""
from __future__ import annotations

import argparse
import time

import torch

from services.model import paged_attention as pa
from services.model.attention_metadata import AttentionMetadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--cases", default="1x100,8x100,32x100,32x1000", help="BxL,...")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    native = pa._native_decode
    if native() is None:
        raise SystemExit("the compiled kernel is not available here (no C++ compiler?)")
    print(f"torch threads {torch.get_num_threads()}, {args.dtype}, K={args.heads} G={args.groups} "
          f"Dh={args.head_size} S={args.block_size}; ms per layer, best of 3 runs of {args.reps}")
    print("| B x L | compiled | torch | speed-up |\n|---|---|---|---|")
    for case in args.cases.split(","):
        b, length = (int(v) for v in case.split("x"))
        s = args.block_size
        m = -(-length // s)
        n = b * m + 8
        k_cache = torch.randn(args.heads, n, s, args.head_size).to(dtype)
        v_cache = torch.randn(args.heads, n, s, args.head_size).to(dtype)
        tables = torch.randperm(n)[:b * m].view(b, m)
        meta = AttentionMetadata(torch.zeros(b, dtype=torch.int64), tables, torch.full((b,), length))
        q = torch.randn(b, args.heads, args.groups, args.head_size).to(dtype)
        workspace = pa.AttentionWorkspace()
        best = {"compiled": float("inf"), "torch": float("inf")}
        for _ in range(3):
            for name, fn in (("compiled", native), ("torch", lambda: None)):
                pa._native_decode = fn
                for _ in range(3):
                    pa.paged_attention(q, k_cache, v_cache, meta, 0.125, 30.0, workspace)
                start = time.perf_counter()
                for _ in range(args.reps):
                    pa.paged_attention(q, k_cache, v_cache, meta, 0.125, 30.0, workspace)
                best[name] = min(best[name], (time.perf_counter() - start) / args.reps * 1000)
        pa._native_decode = native
        print(f"| {b} x {length} | {best['compiled']:.3f} | {best['torch']:.3f} | {best['torch'] / best['compiled']:.1f}x |")


if __name__ == "__main__":
    main()
