"""Grok-1's parallel plan, derived from the code: sharding, communication and memory per GPU.

    python scripts/parallelism_plan.py tables --write docs/parallelism.md   # regenerate the doc's tables
    python scripts/parallelism_plan.py bench                                # CPU: N = 1 against N = 2

Every figure comes from services/model/config.py (PRESETS["grok-1"]), the Shard layout and the buffers of
a model built on the meta device (the exact shapes and dtypes a rank would allocate, nothing allocated).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.model.config import PRESETS, Grok1Config
from services.model.grok1 import Grok1
from services.model.shard import Shard

BEGIN, END = "<!-- plan:begin -->", "<!-- plan:end -->"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: float  # nominal HBM capacity
    link_bytes_per_s: float  # NVLink bandwidth per direction per GPU
    hbm_bytes_per_s: float  # datasheet HBM bandwidth
    expert_dtype: str  # the preset's expert storage (deploy/h100x8.yaml, deploy/h200x8.yaml)


GPUS = (Gpu("H100 SXM (NVLink4)", 80e9, 450e9, 3.35e12, "int8"),
        Gpu("H200 SXM (NVLink4)", 141e9, 450e9, 4.8e12, "bfloat16"))
# Share of the datasheet HBM bandwidth the MoE and attention kernels are assumed to stream weights at;
# an assumption until scripts/gpu_check.sh's bench (the "ours / copy BW" column) measures it.
STREAM_EFFICIENCY = 0.70
ROOFLINE_CONTEXT = 2048  # tokens of context per sequence whose KV cache a decode step reads
MEMORY_UTILIZATION = 0.90  # the share of HBM the engine plans for; activations and workspace use the rest


# --- derived quantities ---------------------------------------------------------------------------
def meta_model(config: Grok1Config, size: int, rank: int = 0, int8: bool = True,
               expert_dtype: torch.dtype | None = None) -> Grok1:
    with torch.device("meta"):
        return Grok1(config, torch.bfloat16, int8=int8, shard=Shard(rank, size), expert_dtype=expert_dtype)


def _group(name: str) -> str:
    if ".moe." in name:
        return "experts"
    if ".multi_head_attention." in name:
        return "attention"
    if name.startswith("in_out_embed."):
        return "embedding"
    return "other"  # norms, routers, rotary tables


EXPERT_TORCH_DTYPES = {"int8": torch.int8, "bfloat16": torch.bfloat16}


def rank_memory(config: Grok1Config, size: int, int8: bool, expert_dtype: str | None = None) -> dict[str, int]:
    """Bytes of one rank's model buffers by group (all ranks hold the same shapes)."""
    out = {"experts": 0, "attention": 0, "embedding": 0, "other": 0}
    experts = None if expert_dtype is None else EXPERT_TORCH_DTYPES[expert_dtype]
    for name, buffer in meta_model(config, size, int8=int8, expert_dtype=experts).named_buffers():
        out[_group(name)] += buffer.numel() * buffer.element_size()
    out["total"] = sum(out.values())
    return out


def parameters_over_ranks(config: Grok1Config, size: int) -> int:
    """Weights summed over every rank's shard, replicated ones (norms, routers) once."""
    total = 0
    for rank in range(size):
        for name, tensor in meta_model(config, size, rank).state_dict().items():
            replicated = name.endswith(("router.w", ".scale"))
            if name.endswith(".scales") or (replicated and rank > 0):
                continue
            total += tensor.numel()
    return total


def all_reduce_bytes_per_layer(config: Grok1Config, dtype: str) -> int:
    """Per token: the attention output and the MoE output, D values each (grok1.py DecoderLayer)."""
    return 2 * config.emb_size * DTYPE_BYTES[dtype]


def kv_bytes_per_token(config: Grok1Config, size: int, dtype: str) -> int:
    """K and V of every layer for this rank's kv heads (Grok1.allocate_kv_cache)."""
    return 2 * config.num_layers * (config.num_kv_heads // size) * config.key_size * DTYPE_BYTES[dtype]


def ring_factor(size: int) -> float:
    return 2 * (size - 1) / size  # bytes each GPU sends per byte all-reduced (reduce-scatter + all-gather)


# --- tables ------------------------------------------------------------------------------------------
def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _rule(columns: int) -> str:
    return "|" + "---|" * columns


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def sharding_table(config: Grok1Config) -> list[str]:
    rows = [_row("N", "q heads / rank", "kv heads / rank", "experts on rank 0", "vocab rows / rank",
                 "params over ranks"), _rule(6)]
    for n in (1, 2, 4, 8):
        s = Shard(0, n)
        rows.append(_row(n, len(s.q_heads(config)), len(s.kv_heads(config)), s.experts(config),
                         len(s.vocab_rows(config)), f"{parameters_over_ranks(config, n):,}"))
    return rows


def communication_table(config: Grok1Config, size: int, latency_us: float) -> list[str]:
    dtype = "bfloat16"
    layer = all_reduce_bytes_per_layer(config, dtype)
    per_token = config.num_layers * layer + config.emb_size * DTYPE_BYTES[dtype]  # + embedding all-reduce
    gather = (size - 1) / size * config.vocab_size * DTYPE_BYTES[dtype]  # each GPU sends = receives
    ring = ring_factor(size)
    collectives = 2 * config.num_layers + 2  # per step: 2 per layer, the embedding's, the LM head's gather
    lines = [(f"bf16 activations, N = {size}, ring all-reduce: each GPU sends 2(N-1)/N = {ring:.2f} x the "
              f"bytes all-reduced."), "",
             _row("GPU", "link GB/s per direction", "per token", "bytes all-reduced", "bytes each GPU sends",
                  "time"), _rule(6)]
    for gpu in GPUS:
        bw = gpu.link_bytes_per_s
        for what, reduced, sent in (
                (f"one layer (2 all-reduces of D = {config.emb_size})", f"{layer:,}", ring * layer),
                (f"{config.num_layers} layers + embedding all-reduce", f"{per_token:,}", ring * per_token),
                ("LM head all-gather (per sampled token)", "-", gather)):
            lines.append(_row(gpu.name, f"{bw / 1e9:.0f}", what, reduced, f"{sent:,.0f}",
                              f"{sent / bw * 1e9:,.1f} ns"))
    lines += ["", (f"Per step: {collectives} collectives whatever the batch, so small steps are "
                   f"latency-bound. The last column adds {collectives} x {latency_us:g} us, an assumed "
                   f"latency of one small NVLink collective (`--latency-us`; not measured here). Same "
                   f"for H100 and H200: both have NVLink4."), "",
              _row("step", "tokens T", "sampled S", "bytes each GPU sends", "bandwidth time",
                   "with latency floor"), _rule(6)]
    bw = GPUS[0].link_bytes_per_s
    for what, t, sampled in (("decode, 1 sequence", 1, 1), ("decode, 64 sequences", 64, 64),
                             ("decode, 256 sequences", 256, 256), ("prefill chunk of 2048 tokens", 2048, 1)):
        sent = t * ring * per_token + sampled * gather
        seconds = sent / bw
        floor = seconds + collectives * latency_us * 1e-6
        lines.append(_row(what, t, sampled, f"{sent / 1e6:,.2f} MB", f"{seconds * 1e6:,.1f} us",
                          f"{floor * 1e3:.2f} ms"))
    return lines


def memory_table(config: Grok1Config) -> list[str]:
    """Attention stays int8 as released; the experts are int8 (the H100 preset) or bfloat16 (H200)."""
    lines = [_row("GPU", "N", "experts", "preset", "experts GB", "attention", "embedding", "other",
                  "weights / GPU", "KV / token / GPU", "KV budget / GPU", "max tokens in cache",
                  f"{config.max_seq_len}-token sequences"), _rule(13)]
    for gpu in GPUS:
        for n in (4, 8):
            for experts in EXPERT_TORCH_DTYPES:
                m = rank_memory(config, n, True, experts)
                kv = kv_bytes_per_token(config, n, "bfloat16")
                budget = MEMORY_UTILIZATION * gpu.memory_bytes - m["total"]
                tokens = max(0, int(budget // kv))
                fits = budget > 0
                preset = "yes" if n == 8 and experts == gpu.expert_dtype else ""
                lines.append(_row(gpu.name, n, experts, preset, *(_gb(m[k]) for k in (
                    "experts", "attention", "embedding", "other", "total")), f"{kv / 1024:.0f} KiB",
                    _gb(budget) if fits else "does not fit", f"{tokens:,}",
                    f"{tokens // config.max_seq_len:,}"))
    return lines


def roofline_table(config: Grok1Config, latency_us: float) -> list[str]:
    """Decode step time on 8 GPUs from the bytes the busiest GPU streams per step.

    Per layer the step waits for the GPUs holding the chosen experts: at batch 1 two of eight GPUs
    each stream their one expert; at batch 64 every expert is chosen (P(unchosen) = (6/8)^128) and
    every GPU streams its expert. Either way the critical path streams one expert per layer, plus
    this GPU's attention weights, its KV cache for the batch, and its vocabulary share of the LM head
    (bf16 embeddings). Compute is far below: at batch 64, 16 tokens per expert per layer."""
    n, ring = 8, ring_factor(8)
    per_token_comm = (config.num_layers * all_reduce_bytes_per_layer(config, "bfloat16")
                      + config.emb_size * DTYPE_BYTES["bfloat16"])
    gather = (n - 1) / n * config.vocab_size * DTYPE_BYTES["bfloat16"]
    collectives = 2 * config.num_layers + 2
    lines = [_row("GPU", "experts", "batch", "weights streamed / GPU", "KV read / GPU", "HBM time",
                  "collectives", "step = per-token latency", "tokens/s (all sequences)"), _rule(9)]
    for gpu in GPUS:
        for experts in EXPERT_TORCH_DTYPES:
            m = rank_memory(config, n, True, experts)
            if m["total"] > MEMORY_UTILIZATION * gpu.memory_bytes:
                continue  # does not fit (the memory table)
            weights = m["experts"] + m["attention"] + m["embedding"]
            for batch in (1, 64):
                kv = batch * ROOFLINE_CONTEXT * kv_bytes_per_token(config, n, "bfloat16")
                hbm = (weights + kv) / (STREAM_EFFICIENCY * gpu.hbm_bytes_per_s)
                sent = batch * (ring * per_token_comm + gather)
                comm = sent / gpu.link_bytes_per_s + collectives * latency_us * 1e-6
                step = hbm + comm
                lines.append(_row(gpu.name, experts, batch, _gb(weights), _gb(kv), f"{hbm * 1e3:.1f} ms",
                                  f"{comm * 1e3:.2f} ms", f"{step * 1e3:.1f} ms", f"{batch / step:,.0f}"))
    return lines


def tables(latency_us: float) -> str:
    config = PRESETS["grok-1"]
    capacities = ", ".join(f"{g.name}: {g.memory_bytes / 1e9:.0f} GB" for g in GPUS)
    out = [
        (f"Generated by `python scripts/parallelism_plan.py tables --write docs/parallelism.md` from "
         f"PRESETS[\"grok-1\"] ({config.num_parameters / 1e9:.1f} B parameters, Grok1Config.num_parameters). "
         "GB = 1e9 bytes."),
        "",
        "### Sharding", "", *sharding_table(config), "",
        "### Communication (8 GPUs)", "", *communication_table(config, 8, latency_us), "",
        "### Memory per GPU", "",
        (f"KV budget = {MEMORY_UTILIZATION:.0%} of HBM ({capacities}) minus the weights; the KV cache is "
         "bf16; attention weights int8 as released. \"preset\" marks deploy/h100x8.yaml (int8 experts) and "
         "deploy/h200x8.yaml (bf16 experts)."), "",
        *memory_table(config), "",
        "### Roofline: decode latency on 8 GPUs", "",
        (f"Datasheet HBM bandwidth ({', '.join(f'{g.name}: {g.hbm_bytes_per_s / 1e12:.2f} TB/s' for g in GPUS)}) "
         f"at an assumed {STREAM_EFFICIENCY:.0%} kernel efficiency (not measured: scripts/gpu_check.sh's "
         f"bench measures the fraction of copy bandwidth the MoE kernels reach), KV cache read for "
         f"{ROOFLINE_CONTEXT} tokens of context per sequence, collectives as in the communication table "
         f"({latency_us:g} us assumed per collective). A step of the batch yields one token per sequence: "
         "the step time is each sequence's per-token latency."), "",
        *roofline_table(config, latency_us),
    ]
    return "\n".join(out)


def write_between_markers(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: markers {BEGIN} / {END} not found")
    pattern = re.escape(BEGIN) + ".*?" + re.escape(END)
    new = re.sub(pattern, lambda _: f"{BEGIN}\n{text}\n{END}", doc, flags=re.DOTALL)
    path.write_text(new)


# --- CPU benchmark -------------------------------------------------------------------------------------
def bench(sizes: list[int], num_requests: int, prompt_len: int, output_len: int, model: str,
          rank0_threads: int | None = None) -> list[dict]:
    import numpy as np
    import ray

    from services.engine.llm import LLM
    from services.engine.sampling_params import SamplingParams

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    rows = []
    cores = torch.get_num_threads()
    try:
        for n in sizes:
            # Ray gives the fractional-CPU worker actors one thread each; rank 0 shares out the rest.
            torch.set_num_threads(rank0_threads or max(1, cores // n))
            llm = LLM(model, parallel_size=n, max_num_seqs=num_requests, kv_cache_memory_bytes=256 << 20)
            vocab = llm.engine.model.config.vocab_size
            prompts = np.random.default_rng(0).integers(4, vocab, size=(num_requests, prompt_len)).tolist()
            params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
            stats = llm.engine.stats
            before = _totals(stats)
            started = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - started
            steps, fwd, coll, bcast = (a - b for a, b in zip(_totals(stats), before))
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"parallel_size": n, "model": model, "requests": num_requests,
                         "prompt_len": prompt_len, "output_len": output_len,
                         "rank0_threads": torch.get_num_threads(), "elapsed_s": round(elapsed, 2),
                         "output_tok_s": round(generated / elapsed, 1), "steps": steps,
                         "forward_s": round(fwd, 2), "collective_s": round(coll, 2),
                         "collective_ms_per_step": round(1000 * coll / max(steps, 1), 2),
                         "broadcast_ms_per_step": round(1000 * bcast / max(steps, 1), 3),
                         "rank_expert_tokens": list(stats.rank_expert_tokens)})
            if llm.engine.group is not None:
                llm.engine.runner.shutdown()
            del llm
    finally:
        torch.set_num_threads(cores)
        ray.shutdown()
    return rows


def _totals(stats) -> tuple[float, ...]:
    return stats.steps, stats.forward_s_total, stats.collective_s_total, stats.step_broadcast_s_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tables", help="sharding, communication and memory tables for Grok-1")
    t.add_argument("--write", type=Path, help="replace the text between the plan markers of this file")
    t.add_argument("--latency-us", type=float, default=10.0,
                   help="assumed latency of one small NVLink collective (not measured here)")
    b = sub.add_parser("bench", help="CPU throughput and collective time, N = 1 against N = 2")
    b.add_argument("--model", default="cpu-bench")
    b.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    b.add_argument("--num-requests", type=int, default=16)
    b.add_argument("--prompt-len", type=int, default=64)
    b.add_argument("--output-len", type=int, default=32)
    b.add_argument("--rank0-threads", type=int, help="torch threads of rank 0 (default: cores / N)")
    args = parser.parse_args(argv)
    if args.command == "tables":
        text = tables(args.latency_us)
        if args.write:
            write_between_markers(args.write, text)
        else:
            print(text)
        return 0
    for row in bench(args.sizes, args.num_requests, args.prompt_len, args.output_len, args.model,
                     args.rank0_threads):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
