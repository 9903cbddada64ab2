"""python -m kernels.aot: compile every Triton kernel for Hopper (sm_90) and Ampere (sm_80) on any machine.

Triton's real backend (not the interpreter) runs without a GPU: this compiles each launch the
dispatch would make for Grok-1 (hidden 6144, ffn 32768, 8 experts, top-2) at expert parallelism
1/2/4/8, for every token bucket of every tile config in kernels/configs/, with bfloat16
activations and int8 (W8A16) or bfloat16 experts. The arguments come from the launchers' own
argument builders over meta tensors, so the specialization (16-divisible sizes, unit strides) is
the one the JIT makes at run time. For each distinct kernel it prints registers per thread, spilled
bytes (ptxas), shared memory against the architecture's limit, warps, stages and the tensor-core
instruction of the main loop, and exits 1 on a compile error, shared memory over the limit or a spill.

Compiled with the triton installed here; a GPU host's older triton may allocate registers
differently, so the GPU check (scripts/gpu_check.sh) still runs the kernels for real.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .routing import Routing, padded_capacity
from .tile_config import CONFIG_DIR, MoeTileConfig, parse_config_file

# Legend: T = tokens, K = top_k, S = T * K slots, E = experts, L = local experts, D = hidden, F = ffn,
# R = scale row blocks, P = padded capacity.

GROK1 = {"hidden": 6144, "ffn": 32768, "num_experts": 8, "top_k": 2, "row_blocks": 8}
# Shared memory a block may opt in to (CUDA programming guide, compute capabilities table).
ARCHS = {"sm90": (90, 227 * 1024), "sm80": (80, 163 * 1024)}
KERNELS = ("gating", "gate_up", "down")
WEIGHTS = {"int8": torch.int8, "bf16": torch.bfloat16}
MAX_REGS_PER_BLOCK = 64 * 1024


@dataclass(frozen=True)
class Variant:
    """One launch as the dispatch makes it."""

    kernel: str
    arch: str
    weights: str
    ep: int
    tokens: int
    config: MoeTileConfig


@dataclass
class Compiled:
    kernel: str
    arch: str
    weights: str
    uses: str  # "EP<ep> T<tokens>" of every variant that compiles to this kernel
    tiles: str
    split_k: int
    warps: int
    stages: int
    regs: int
    spill_bytes: int
    smem: int
    smem_limit: int
    mma: str
    seconds: float
    error: str = ""

    @property
    def failures(self) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.smem > self.smem_limit:
            out.append(f"shared memory {self.smem} B > {self.smem_limit} B")
        if self.regs * self.warps * 32 > MAX_REGS_PER_BLOCK:
            out.append(f"{self.regs} registers x {self.warps * 32} threads > {MAX_REGS_PER_BLOCK}")
        return out


def grok1_config_files(config_dir: Path, eps: list[int]) -> dict[int, list[Path]]:
    """EP -> the Grok-1 tile config files (generic and per device) for its local expert count."""
    files = {}
    for ep in eps:
        local = GROK1["num_experts"] // ep
        pattern = f"e{local}_d{GROK1['hidden']}_f{GROK1['ffn']}*.json"
        files[ep] = sorted(Path(config_dir).glob(pattern))
    return files


def variants(config_dir: Path, archs: list[str], eps: list[int], weights: list[str], kernels: list[str],
             buckets: list[int] | None) -> list[Variant]:
    out = []
    for ep, paths in grok1_config_files(config_dir, eps).items():
        for path in paths:
            configs = parse_config_file(json.loads(path.read_text()))
            for kind in weights:
                for tokens, config in sorted(configs.get(kind, {}).items()):
                    if buckets is not None and tokens not in buckets:
                        continue
                    out += [Variant(k, a, kind, ep, tokens, config) for a in archs for k in kernels]
    return out


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def launch_of(v: Variant):
    """(jit function, arguments, keywords) of the variant's launch, over meta tensors."""
    from .triton_down import _down_kernel, down_launch
    from .triton_gate_up import _gate_up_kernel, gate_up_launch
    from .triton_gating import _topk_gating_kernel, gating_launch
    from .triton_launch import DotPlan

    d, f, e, k = GROK1["hidden"], GROK1["ffn"], GROK1["num_experts"], GROK1["top_k"]
    local, t, block_m = e // v.ep, v.tokens, v.config.block_m
    s = t * k
    capacity = padded_capacity(s, local, block_m)
    routing = Routing(topk_weights=_meta(t, k, dtype=torch.float32), topk_ids=_meta(t, k, dtype=torch.int32),
                      sorted_slot_ids=_meta(capacity, dtype=torch.int32),
                      block_expert_ids=_meta(capacity // block_m, dtype=torch.int32),
                      num_padded=_meta(1, dtype=torch.int32), expert_counts=_meta(local, dtype=torch.int32),
                      block_m=block_m)
    if v.kernel == "gating":
        expert_map = _meta(e, dtype=torch.int32) if local < e else None
        # The engine counts routes per expert every step (metrics).
        _, args, keywords = gating_launch(_meta(t, e, dtype=torch.float32), routing, expert_map,
                                          _meta(e, dtype=torch.int64))
        return _topk_gating_kernel, args, keywords
    wdtype = WEIGHTS[v.weights]
    int8 = wdtype == torch.int8
    if v.kernel == "gate_up":
        w13 = _meta(local, d, 2 * f, dtype=wdtype)
        s13 = _meta(local, 1, 2 * f, dtype=torch.bfloat16) if int8 else None
        plan = DotPlan.for_activations(_gate_up_kernel, torch.bfloat16)
        _, args, keywords = gate_up_launch(_meta(t, d, dtype=torch.bfloat16), w13, s13,
                                           _meta(s, f, dtype=torch.bfloat16), routing, v.config.gate_up, plan)
        return _gate_up_kernel, args, keywords
    w2 = _meta(local, f, d, dtype=wdtype)
    s2 = _meta(local, GROK1["row_blocks"], d, dtype=torch.bfloat16) if int8 else None
    plan = DotPlan.for_activations(_down_kernel, torch.bfloat16)
    _, args, keywords = down_launch(_meta(s, f, dtype=torch.bfloat16), w2, s2, _meta(t, d, dtype=torch.float32),
                                    routing, v.config.down, plan)
    return _down_kernel, args, keywords


def _specialize(fn, args, keywords, backend):
    """What JITFunction.run hands the compiler for these arguments (signature, constants, attributes)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    keywords = {**keywords, "debug": knobs.runtime.debug,
                "instrumentation_mode": knobs.compilation.instrumentation_mode,
                "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}
    with warnings.catch_warnings():
        # Triton 3.9 warns that a default of its options will change; what runs is compiled alike.
        warnings.simplefilter("ignore")
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **keywords)
        return fn._pack_args(backend, keywords, bound, specialization, options)


def _ptxas_figures(log: str) -> tuple[int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(f"no register count in the ptxas log:\n{log[-2000:]}")
    return int(regs.group(1)), 0 if spills is None else int(spills.group(1)) + int(spills.group(2))


def _main_loop_mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def prepare(v: Variant):
    """(dedup key, what to compile): variants that specialize the same way compile once."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", ARCHS[v.arch][0], 32)
    backend = make_backend(target)
    fn, args, keywords = launch_of(v)
    options, signature, constexprs, attrs = _specialize(fn, args, keywords, backend)
    key = (v.kernel, v.arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), options.num_warps, options.num_stages)
    return key, (fn, target, options, signature, constexprs, attrs, keywords)


def compile_variant(v: Variant, prepared, cache_dir: str) -> Compiled:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    fn, target, options, signature, constexprs, attrs, keywords = prepared
    tiles = (f"{v.config.block_m}x{v.config.gate_up.block_n}x{v.config.gate_up.block_k}" if v.kernel == "gate_up"
             else f"{v.config.block_m}x{v.config.down.block_n}x{v.config.down.block_k}" if v.kernel == "down"
             else f"T {keywords['BLOCK_T']} / S {keywords['BLOCK_S']} / P {keywords['BLOCK_P']}")
    result = Compiled(v.kernel, v.arch, v.weights if v.kernel != "gating" else "-", "", tiles,
                      v.config.down.split_k if v.kernel == "down" else 1, options.num_warps, options.num_stages,
                      0, 0, 0, ARCHS[v.arch][1], "-", 0.0)
    log = io.StringIO()
    started = time.perf_counter()
    try:
        with knobs.cache.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A cold cache makes ptxas run, and its log is where registers and spills are reported.
            knobs.cache.dir = cache_dir
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        result.error = f"{type(exc).__name__}: {first_line}"
        result.seconds = time.perf_counter() - started
        return result
    result.seconds = time.perf_counter() - started
    result.regs, result.spill_bytes = _ptxas_figures(log.getvalue())
    result.smem = compiled.metadata.shared
    result.mma = _main_loop_mma(compiled.asm["ptx"])
    return result


def run(variant_list: list[Variant], progress=None) -> list[Compiled]:
    results: dict[tuple, Compiled] = {}
    uses: dict[tuple, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="grok-aot-") as tmp:
        for v in variant_list:
            key, prepared = prepare(v)
            if key not in results:
                # Each kernel in its own cache directory: a hit would skip ptxas and its log.
                results[key] = compile_variant(v, prepared, tempfile.mkdtemp(dir=tmp))
                if progress:
                    progress(results[key])
            uses.setdefault(key, []).append(f"EP{v.ep} T{v.tokens}")
    for key, result in results.items():
        result.uses = ", ".join(dict.fromkeys(uses[key]))
    return list(results.values())


def format_table(results: list[Compiled]) -> str:
    lines = [("| kernel | arch | weights | used by (EP, tokens) | tiles M x N x K | split K | warps | stages "
              "| regs/thread | spilled B | smem KiB / limit | main loop | compile s | status |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        status = "; ".join(r.failures) or "ok"
        lines.append(f"| {r.kernel} | {r.arch} | {r.weights} | {r.uses} | {r.tiles} | {r.split_k} | {r.warps} "
                     f"| {r.stages} | {r.regs} | {r.spill_bytes} | {r.smem / 1024:.1f} / {r.smem_limit // 1024} "
                     f"| {r.mma} | {r.seconds:.1f} | {status} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated, of {list(ARCHS)}")
    parser.add_argument("--ep", default="1,2,4,8", help="expert-parallel sizes (8 experts over EP ranks)")
    parser.add_argument("--weights", default=",".join(WEIGHTS), help="expert weight kinds: int8,bf16")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {list(KERNELS)}")
    parser.add_argument("--buckets", default=None, help="token buckets to compile (default: every one in a file)")
    parser.add_argument("--config-dir", type=Path, default=CONFIG_DIR)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_gate_up import _gate_up_kernel

    if isinstance(_gate_up_kernel, InterpretedFunction):
        sys.exit("kernels.aot compiles for real: unset TRITON_INTERPRET")
    archs, kernels = args.arch.split(","), args.kernels.split(",")
    for name, given, known in (("arch", archs, ARCHS), ("kernel", kernels, KERNELS)):
        if set(given) - set(known):
            sys.exit(f"unknown {name} {sorted(set(given) - set(known))}; choose from {list(known)}")
    variant_list = variants(args.config_dir, archs, _ints(args.ep), args.weights.split(","), kernels,
                            None if args.buckets is None else _ints(args.buckets))
    if not variant_list:
        sys.exit(f"no Grok-1 tile configs in {args.config_dir} for EP {args.ep}")
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(variant_list)} launches", flush=True)
    results = run(variant_list, lambda r: print(f"  {r.kernel} {r.arch} {r.weights} {r.tiles}: "
                                                f"{'; '.join(r.failures) or 'ok'} ({r.seconds:.1f} s)",
                                                file=sys.stderr, flush=True))
    print(format_table(results))
    failed = [r for r in results if r.failures]
    print(f"\n{len(results)} distinct kernels compiled, {len(failed)} failed")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "failures": r.failures} for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
