"""python -m kernels.bench: the MoE layer on this machine, the dispatch path against its peer.

The peer is kernels.naive_moe (Hugging Face Mixtral's loop), measured in the same run on the same
weights and routing, calls interleaved so that all see the same machine state. On CUDA "ours" is the
Triton path and a third column times the torch path on the same device (kernels.reference, the
per-expert loop the kernels are tested against). Also measures the memory bandwidth with a copy
test, to say what fraction of it each call streams the weights it touches at.

Weights "int8" are W8A16 as released (int8 with bfloat16 scales, one scale row for linear and
linear_v, 8 row blocks for linear_1) with bfloat16 activations.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from .dispatch import ExpertWeights, fused_moe
from .naive_moe import LinearExperts, naive_moe

# Legend: T = tokens, E = experts (global), L = local experts, D = hidden, F = ffn.


@dataclass(frozen=True)
class BenchShape:
    hidden: int
    ffn: int
    num_experts: int = 8
    num_local: int = 8  # Grok-1 shards hold num_experts / EP of them
    top_k: int = 2


SHAPES = {
    "cpu-bench": BenchShape(hidden=1024, ffn=2048),
    # One rank's experts of Grok-1 at EP 8 and EP 4: the real per-expert shapes, fewer experts.
    "grok1-ep8": BenchShape(hidden=6144, ffn=32768, num_local=1),
    "grok1-ep4": BenchShape(hidden=6144, ffn=32768, num_local=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def _quantize(w: torch.Tensor, row_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (row block, column), scales in bfloat16: w [L, K, N] -> ([L, K, N], [L, R, N])."""
    experts, rows, cols = w.shape
    blocks = w.reshape(experts, row_blocks, rows // row_blocks, cols)
    scales = (blocks.abs().amax(dim=2) / 127).clamp_min(1e-8).to(torch.bfloat16)  # [L, R, N]
    q = torch.round(blocks / scales.float()[:, :, None, :]).clamp(-127, 127).to(torch.int8)
    return q.reshape(experts, rows, cols), scales


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 29, reps: int = 7) -> float:
    """GB/s of a large tensor copy, counting bytes read plus bytes written (the STREAM convention)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


STORAGES = ("in-out", "out-in")  # the checkpoint's order, nn.Linear's order (passed as [in, out] views)


def make_experts(shape: BenchShape, dtype: torch.dtype, seed: int, device: torch.device,
                 storage: str = "in-out") -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(shape.num_local, shape.hidden, 2 * shape.ffn, generator=gen) * shape.hidden ** -0.5
    w2 = torch.randn(shape.num_local, shape.ffn, shape.hidden, generator=gen) * shape.ffn ** -0.5
    if dtype == torch.int8:
        (q13, s13), (q2, s2) = _quantize(w13, 1), _quantize(w2, 8)
        return ExpertWeights(q13.to(device), q2.to(device), s13.to(device), s2.to(device))
    if storage == "out-in":
        return ExpertWeights(w13.transpose(1, 2).to(device, dtype).contiguous().transpose(1, 2),
                             w2.transpose(1, 2).to(device, dtype).contiguous().transpose(1, 2))
    return ExpertWeights(w13.to(device, dtype), w2.to(device, dtype))


def expert_map_of(shape: BenchShape, device: torch.device) -> torch.Tensor | None:
    """Rank 0's map: expert e lives on rank e mod EP."""
    if shape.num_local == shape.num_experts:
        return None
    ranks = shape.num_experts // shape.num_local
    ids = torch.arange(shape.num_experts, dtype=torch.int32)
    return torch.where(ids % ranks == 0, ids // ranks, -1).to(device, torch.int32)


def make_logits(shape: BenchShape, num_tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, shape.num_experts, generator=gen)
    expert_map = expert_map_of(shape, torch.device("cpu"))
    if expert_map is not None:
        # Route every token to this rank's experts: the busiest rank sets the step time under EP.
        logits += 8.0 * (expert_map >= 0)
    return logits.to(device)


def time_interleaved(fns: dict, min_reps: int, budget_s: float, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn, calls alternating between them."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()  # warm-up: allocator, thread pool, kernel compilation
    sync()
    times = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s
    while min(len(t) for t in times.values()) < min_reps or time.perf_counter() < deadline:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
        if len(next(iter(times.values()))) >= 200:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def bench_case(shape: BenchShape, dtype: torch.dtype, num_tokens: int, experts: ExpertWeights,
               peer: LinearExperts, min_reps: int, budget_s: float) -> dict:
    device = experts.device
    logits = make_logits(shape, num_tokens, num_tokens, device)
    act_dtype = torch.bfloat16 if dtype == torch.int8 else dtype
    x = torch.randn(num_tokens, shape.hidden, generator=torch.Generator().manual_seed(1)).to(device, act_dtype)
    expert_map = expert_map_of(shape, device)
    local_of_global = None if expert_map is None else expert_map.tolist()
    ours = fused_moe(x, logits, experts, shape.top_k, expert_map)
    theirs = naive_moe(x, logits, peer, shape.top_k, local_of_global)
    rel_err = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
    fns = {"ours": lambda: fused_moe(x, logits, experts, shape.top_k, expert_map),
           "naive": lambda: naive_moe(x, logits, peer, shape.top_k, local_of_global)}
    if device.type == "cuda":
        from . import reference

        fns["torch"] = lambda: reference.fused_moe(x, logits, experts, shape.top_k, expert_map)
    times = time_interleaved(fns, min_reps, budget_s, device)
    counts = torch.zeros(shape.num_experts, dtype=torch.int64, device=device)
    fused_moe(x, logits, experts, shape.top_k, expert_map, counts)
    held = (counts if expert_map is None else counts[expert_map >= 0]).cpu()
    bytes_per_expert = (experts.w13[0].numel() + experts.w2[0].numel()) * experts.w13.element_size()
    weight_bytes = int((held > 0).sum()) * bytes_per_expert
    flops = 6 * int(held.sum()) * shape.hidden * shape.ffn
    return {"tokens": num_tokens, "ours_s": times["ours"], "naive_s": times["naive"], "torch_s": times.get("torch"),
            "rel_err": rel_err,
            "weight_bytes": weight_bytes, "flops": flops}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="cpu-bench", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help="weights (and activations): fp32, bf16, int8 (W8A16, bfloat16 activations)")
    parser.add_argument("--batches", default="1,16,256", help="tokens per call")
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case, at least")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the Triton path on a GPU")
    parser.add_argument("--storage", default=",".join(STORAGES),
                        help="how our expert weights are stored: in-out (checkpoint), out-in (nn.Linear)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"machine: {machine()}" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(f"copy bandwidth: {bandwidth:.1f} GB/s (read + write, 512 MiB buffers)")
    # Other processes on the machine skew every figure: say how busy it was.
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print()
    print("| shape | weights | ours stored | tokens | ours ms | naive ms | torch ms | speedup | ours GB/s | naive GB/s "
          "| ours TFLOP/s | naive TFLOP/s | ours / copy BW | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for storage in args.storage.split(","):
                experts = make_experts(shape, dtype, 0, device, storage)
                # The peer keeps its own [out, in] weights, as nn.Linear does (views when ours are stored so).
                peer = LinearExperts.from_expert_weights(experts)
                for num_tokens in (int(b) for b in args.batches.split(",")):
                    r = bench_case(shape, dtype, num_tokens, experts, peer, args.min_reps, args.budget)
                    ours_gbs = r["weight_bytes"] / r["ours_s"] / 1e9
                    naive_gbs = r["weight_bytes"] / r["naive_s"] / 1e9
                    torch_ms = "-" if r["torch_s"] is None else f"{r['torch_s'] * 1e3:.2f}"
                    print(f"| {shape_name} | {dtype_name} | {storage} | {num_tokens} | {r['ours_s'] * 1e3:.2f} | "
                          f"{r['naive_s'] * 1e3:.2f} | {torch_ms} | {r['naive_s'] / r['ours_s']:.2f}x | {ours_gbs:.1f} | "
                          f"{naive_gbs:.1f} | {r['flops'] / r['ours_s'] / 1e12:.3f} | "
                          f"{r['flops'] / r['naive_s'] / 1e12:.3f} | {ours_gbs / bandwidth:.0%} | {r['rel_err']:.1e} |", flush=True)
                del experts, peer
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
