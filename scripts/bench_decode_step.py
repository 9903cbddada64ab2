"""Decode-step time of the engine with the dense layers (attention projections, LM head) on
kernels.dispatch.dense_matmul against plain `x @ w`, alternating in one process so that both see the
same machine state.

    python scripts/bench_decode_step.py [--model cpu-bench] [--batch 8] [--reps 4] [--steps 8]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from kernels.dispatch import dense_matmul
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.model import grok1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cpu-bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    engine = LLM(args.model, dtype="float32", max_num_seqs=max(64, args.batch), kv_cache_memory_bytes=1 << 30).engine
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=2 * args.reps * (args.steps + 1) + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [rng.randrange(3, vocab) for _ in range(args.prompt_len)], params)
    for _ in range(4):  # prefill, then warm decode steps
        engine.step()
    impls = {"dense_matmul": dense_matmul, "x @ w": torch.matmul}
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.reps):
        for name, fn in impls.items():
            grok1.dense_matmul = fn
            engine.step()
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    grok1.dense_matmul = dense_matmul
    print(f"{args.model}, {args.batch} sequences decoding, ms per step ({args.reps} runs of {args.steps} steps):")
    for name, values in times.items():
        print(f"  {name:>12}: mean {statistics.mean(values):.1f}  runs {[round(v) for v in values]}")


if __name__ == "__main__":
    main()
