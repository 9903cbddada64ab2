"""Where a decode step's time goes, and how close it runs to the machine's memory bandwidth.

    python scripts/profile_decode.py [--model cpu-bench] [--dtype float32] [--batches 1,8,32]
                                     [--prompt-len 64] [--steps 8] [--json-out FILE]

For each batch size B, B sequences are prefilled and then decoded step by step; the script times every
part of `LLMEngine.step` (scheduler, input preparation, model forward split into attention projections,
attention over the paged cache, router + experts, LM head and the rest, sampler, output processing,
statistics) with wall-clock wrappers on the engine's own objects, and counts the bytes a step must read:
the dense weights, the experts the step's tokens were routed to, the LM head and the KV cache of every
decoding sequence. Achieved GB/s = bytes / step time, against a read bandwidth measured in the same
process (a sum over 1 GiB with the same torch threads).

Wrappers cost a few microseconds per call; the script prints the step time with and without them.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import time
from contextlib import ExitStack

import torch

from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.model import grok1


def read_bandwidth_gbs(size_bytes: int = 1 << 30, reps: int = 5) -> float:
    """Best of `reps` sums over a float32 tensor larger than the caches."""
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9


class Timers:
    def __init__(self):
        self.total: dict[str, float] = collections.defaultdict(float)

    def wrap(self, stack: ExitStack, obj, name: str, label: str) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - start

        setattr(obj, name, timed)
        stack.callback(delattr, obj, name)

    def hook(self, stack: ExitStack, module: torch.nn.Module, label: str) -> None:
        starts: list[float] = []

        def pre(*_):
            starts.append(time.perf_counter())

        def post(*_):
            self.total[label] += time.perf_counter() - starts.pop()

        stack.callback(module.register_forward_pre_hook(pre).remove)
        stack.callback(module.register_forward_hook(post).remove)


def element_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ByteCounter:
    """Bytes one step reads: every dense weight, the LM head, each routed expert once, and the KV cache."""

    def __init__(self, model: grok1.Grok1):
        self.model = model
        self.dense = sum(element_bytes(p) for layer in model.decoder_layer
                         for m in layer.multi_head_attention.modules() if isinstance(m, grok1.Linear)
                         for p in list(m.parameters()) + list(m.buffers()))
        self.dense += sum(element_bytes(layer.router.w) for layer in model.decoder_layer)
        self.lm_head = element_bytes(model.in_out_embed.embeddings)
        moe = model.decoder_layer[0].moe
        tensors = [moe.linear_linear_v.w, moe.linear_1.w, moe.linear_linear_v.scales, moe.linear_1.scales]
        self.per_expert = sum(element_bytes(t) for t in tensors if t is not None) // moe.linear_1.w.shape[0]
        self.experts_touched = 0
        cache = model.decoder_layer[0]
        attn = cache.multi_head_attention
        dtype_bytes = torch.empty((), dtype=model.in_out_embed.embeddings.dtype).element_size()
        self.kv_per_token = 2 * len(model.decoder_layer) * attn.num_kv_heads * attn.key_size * dtype_bytes
        self.kv_tokens = 0

    def install(self, stack: ExitStack) -> None:
        for layer in self.model.decoder_layer:
            def pre(_module, args):
                router_logits = args[1]  # [T, E]
                top_k = _module.top_k
                self.experts_touched += int(router_logits.topk(top_k, dim=-1).indices.unique().numel())

            stack.callback(layer.moe.register_forward_pre_hook(pre).remove)

    def step_bytes(self, steps: int) -> float:
        """Mean over `steps` counted steps."""
        return (self.dense + self.lm_head
                + (self.experts_touched * self.per_expert + self.kv_tokens * self.kv_per_token) / steps)


def profile_batch(llm: LLM, batch: int, prompt_len: int, steps: int, rng: random.Random) -> dict:
    engine = llm.engine
    vocab = engine.model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4 * steps + 16, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
    while any(s.num_output_tokens == 0 for r in engine._requests.values() for s in r.seqs):
        engine.step()  # prefill (possibly chunked) until every sequence decodes
    for _ in range(2):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    bare_ms = (time.perf_counter() - start) / steps * 1000

    timers, counter = Timers(), ByteCounter(engine.model)
    model = engine.model
    with ExitStack() as stack:
        timers.wrap(stack, engine.scheduler, "schedule", "scheduler")
        timers.wrap(stack, engine.scheduler, "update", "scheduler")
        timers.wrap(stack, engine.runner, "prepare", "prepare inputs")
        timers.wrap(stack, engine.sampler, "sample_sequences", "sampler")
        timers.wrap(stack, engine, "_postprocess", "output processing")
        timers.wrap(stack, engine.stats, "record_step", "statistics")
        timers.wrap(stack, model, "compute_logits", "LM head")
        timers.hook(stack, model, "forward")
        for layer in model.decoder_layer:
            attn = layer.multi_head_attention
            timers.hook(stack, attn, "attention (all)")
            for linear in (attn.query, attn.key, attn.value, attn.linear):
                timers.hook(stack, linear, "attention projections")
            timers.hook(stack, layer.router, "router")
            timers.hook(stack, layer.moe, "experts")
        counter.install(stack)
        context = 0
        start = time.perf_counter()
        for _ in range(steps):
            context += sum(s.num_tokens for r in engine._requests.values() for s in r.seqs)
            engine.step()
        step_ms = (time.perf_counter() - start) / steps * 1000
    counter.kv_tokens = context
    for request_id in list(engine._requests):
        engine.abort_request(request_id)
    engine.step()

    t = {k: v / steps * 1000 for k, v in timers.total.items()}
    forward = t.pop("forward", 0.0)
    t["attention core (paged)"] = t.pop("attention (all)", 0.0) - t.get("attention projections", 0.0)
    t["forward other (embed, norms, residual)"] = forward - sum(
        t.get(k, 0.0) for k in ("attention core (paged)", "attention projections", "router", "experts"))
    t["step other"] = step_ms - forward - sum(
        t.get(k, 0.0) for k in ("LM head", "scheduler", "prepare inputs", "sampler", "output processing",
                                "statistics"))
    step_bytes = counter.step_bytes(steps)
    return {"batch": batch, "step_ms": step_ms, "bare_step_ms": bare_ms, "parts_ms": t,
            "bytes_per_step": step_bytes, "experts_per_layer": counter.experts_touched / steps / len(model.decoder_layer),
            "achieved_gbs": step_bytes / (bare_ms / 1000) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cpu-bench")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(batches), kv_cache_memory_bytes=1 << 30)
    bandwidth = read_bandwidth_gbs()
    rng = random.Random(0)
    rows = [profile_batch(llm, b, args.prompt_len, args.steps, rng) for b in batches]
    print(f"{args.model} {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"read bandwidth {bandwidth:.1f} GB/s (sum over 1 GiB, best of 5)")
    labels = list(rows[0]["parts_ms"])
    print("| part (ms per decode step) | " + " | ".join(f"B={r['batch']}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{r['parts_ms'][label]:.2f}" for r in rows) + " |")
    print("| **step (profiled)** | " + " | ".join(f"**{r['step_ms']:.2f}**" for r in rows) + " |")
    print("| step (no wrappers) | " + " | ".join(f"{r['bare_step_ms']:.2f}" for r in rows) + " |")
    print("| experts read per layer | " + " | ".join(f"{r['experts_per_layer']:.1f}" for r in rows) + " |")
    print("| MB read per step | " + " | ".join(f"{r['bytes_per_step'] / 1e6:.0f}" for r in rows) + " |")
    print("| achieved GB/s | " + " | ".join(f"{r['achieved_gbs']:.1f}" for r in rows) + " |")
    print("| fraction of read bandwidth | " + " | ".join(f"{r['achieved_gbs'] / bandwidth:.0%}" for r in rows)
          + " |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "read_bandwidth_gbs": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
