#!/usr/bin/env python3
"""Offline throughput benchmark of the vLLM CPU peer (runs in .venv-vllm).

Builds (or reuses) a Mixtral model directory with the grok-serve preset's
shape, starts ``vllm.LLM`` with dummy weights and no tokenizer, and times one
``LLM.generate`` call over a fixed synthetic workload after a warm-up.
The result is printed as ONE JSON line on stdout (vLLM's log lines are sent
to stderr via VLLM_LOGGING_STREAM; a few non-vLLM warnings may still reach
stdout, so take the last line that starts with ``{``), and optionally written
to ``--json-out``.

Example::

    .venv-vllm/bin/python loadtests/peers/vllm/offline_bench.py \\
        --dtype bfloat16 --num-requests 64 --prompt-len 128 --output-len 128

vLLM CPU settings are environment variables read when vLLM is imported; the
flags below set them before the import (an already-set environment variable
wins over a flag's default but not over an explicitly given flag):

* ``--kv-cache-gib``  -> VLLM_CPU_KVCACHE_SPACE (GiB of KV cache; default 4)
* ``--threads-bind``  -> VLLM_CPU_OMP_THREADS_BIND (``auto`` | ``nobind`` |
  ``all`` | a CPU list such as ``0-1``; default ``auto``: on a 2-CPU box the
  model worker gets one CPU and vLLM's engine/front-end processes the other,
  which measured faster than giving the worker both, see README)
* ``--reserved-cpus`` -> VLLM_CPU_NUM_OF_RESERVED_CPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="vLLM CPU offline throughput benchmark (dummy weights, or a Grok-1 checkpoint through grok-serve's plugin)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-dir",
                   help="existing model dir with a config.json; default: "
                        "$TMPDIR/vllm-peer-model-<config hash>, written by "
                        "mixtral_config.py")
    m.add_argument("--model-json", metavar="FILE",
                   help="dimensions JSON passed to mixtral_config.py "
                        "(ignored with --model-dir)")
    m.add_argument("--grok1-plugin", action="store_true",
                   help="--model-dir is a Grok-1 checkpoint: load it through grok-serve's vLLM "
                        "plugin (config_format and load_format grok1) instead of dummy weights")
    m.add_argument("--dtype", default="float32",
                   choices=["float32", "bfloat16", "float16"])
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=64)
    w.add_argument("--prompt-len", type=int, default=128)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--seed", type=int, default=0,
                   help="seed of the random prompt token ids (and of vLLM)")
    w.add_argument("--token-low", type=int, default=3,
                   help="smallest prompt token id (skips bos/eos/pad)")
    w.add_argument("--warmup-requests", type=int, default=4,
                   help="requests in the untimed warm-up generate (0: none)")
    w.add_argument("--warmup-output-len", type=int, default=8)
    w.add_argument("--repeat", type=int, default=1,
                   help="timed generate calls; the JSON reports each and "
                        "the best")
    e = p.add_argument_group("engine")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="default: prompt_len + output_len rounded up to 256")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="scheduler batch limit (vLLM default if unset)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--enforce-eager", action="store_true",
                   help="disable torch.compile (CompilationMode.NONE)")
    e.add_argument("--kv-cache-gib", type=int, default=None,
                   help="VLLM_CPU_KVCACHE_SPACE (default: env or 4)")
    e.add_argument("--threads-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND: auto (default: vLLM "
                        "keeps one CPU for its engine/front-end processes "
                        "and binds the model worker to the rest), nobind, "
                        "or a CPU list like 0-1; 'all' = every CPU")
    e.add_argument("--reserved-cpus", type=int, default=None,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU")
    p.add_argument("--json-out", metavar="FILE",
                   help="also write the JSON result to this file")
    p.add_argument("--label", default=None,
                   help="free-form label copied into the JSON")
    return p.parse_args(argv)


def _all_cpus_spec() -> str:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = list(range(os.cpu_count() or 1))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])
    return ",".join(map(str, cpus))


def configure_env(args: argparse.Namespace) -> dict[str, str]:
    """Set vLLM CPU env vars (before importing vllm); return what is used."""
    if args.threads_bind == "all":
        args.threads_bind = _all_cpus_spec()
    def put(name: str, flag_value: Any, default: str | None) -> None:
        if flag_value is not None:
            os.environ[name] = str(flag_value)
        elif name not in os.environ and default is not None:
            os.environ[name] = default

    put("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib, "4")
    put("VLLM_CPU_OMP_THREADS_BIND", args.threads_bind, "auto")
    put("VLLM_CPU_NUM_OF_RESERVED_CPU", args.reserved_cpus, None)
    # vLLM logs to stdout by default; keep stdout for the JSON result.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # No hub access here; never try to reach one.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    return env_snapshot()


def env_snapshot() -> dict[str, str]:
    keys = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
            "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_SGL_KERNEL",
            "VLLM_CPU_MOE_PREPACK", "VLLM_TARGET_DEVICE",
            "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS",
            "LD_PRELOAD", "HF_HUB_OFFLINE")
    return {k: os.environ[k] for k in keys if k in os.environ}


def cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(),
                            "logical_cpus": os.cpu_count()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and "model" not in info:
                    info["model"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info["isa"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16",
                               "avx512_vnni", "amx_bf16") if f in flags]
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kb = int(f.readline().split()[1])
        info["mem_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def make_model_dir(args: argparse.Namespace) -> str:
    if args.model_dir:
        if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
            sys.exit(f"offline_bench.py: no config.json in {args.model_dir}")
        return args.model_dir
    sys.path.insert(0, HERE)
    import mixtral_config  # stdlib-only sibling

    dims: dict[str, Any] = {}
    if args.model_json:
        dims = mixtral_config.load_json_dims(args.model_json)
    dims["torch_dtype"] = args.dtype
    config = mixtral_config.build_config(dims)
    # A stable path per config: vLLM keys its torch.compile cache
    # (~/.cache/vllm/torch_compile_cache) on the model path, so a fresh
    # temporary dir would recompile (minutes on 2 cores) on every run.
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    path = os.path.join(tempfile.gettempdir(),
                        f"vllm-peer-model-{digest.hexdigest()[:12]}")
    mixtral_config.write_model_dir(path, config)
    return path


def make_prompts(n: int, length: int, vocab: int, seed: int, low: int):
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab) for _ in range(length)]
            for _ in range(n)]


def _rss_mib_tree() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.num_requests, args.prompt_len, args.output_len) < 1:
        sys.exit("offline_bench.py: requests, prompt and output lengths "
                 "must be >= 1")
    settings_env = configure_env(args)
    model_dir = make_model_dir(args)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        model_cfg = json.load(f)
    vocab = int(model_cfg["vocab_size"])

    need = args.prompt_len + args.output_len
    max_model_len = args.max_model_len or -(-need // 256) * 256
    if max_model_len < need:
        sys.exit(f"offline_bench.py: --max-model-len {max_model_len} < "
                 f"prompt_len + output_len = {need}")

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine_kwargs: dict[str, Any] = {
        "model": model_dir,
        "load_format": "grok1" if args.grok1_plugin else "dummy",
        "skip_tokenizer_init": True,
        "dtype": args.dtype,
        "max_model_len": max_model_len,
        "seed": args.seed,
        "enforce_eager": args.enforce_eager,
    }
    if args.grok1_plugin:
        engine_kwargs["config_format"] = "grok1"
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs)
    startup_s = time.perf_counter() - t0

    prompts = make_prompts(args.num_requests, args.prompt_len, vocab,
                           args.seed, args.token_low)
    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len,
                            min_tokens=args.output_len, ignore_eos=True,
                            detokenize=False, seed=args.seed)

    warmup_s = 0.0
    if args.warmup_requests > 0:
        w_prompts = make_prompts(args.warmup_requests, args.prompt_len, vocab,
                                 args.seed + 1, args.token_low)
        w_params = SamplingParams(temperature=0.0,
                                  max_tokens=args.warmup_output_len,
                                  ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in w_prompts],
                     w_params, use_tqdm=False)
        warmup_s = time.perf_counter() - t0

    load_before = _loadavg()
    runs = []
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs.append({"elapsed_s": round(elapsed, 3),
                     "generated_tokens": generated,
                     "generated_tok_s": round(generated / elapsed, 2)})
    best = max(runs, key=lambda r: r["generated_tok_s"])
    rss = _rss_mib_tree()
    load_after = _loadavg()
    settings_env = env_snapshot()  # vLLM adds LD_PRELOAD etc. during init

    cache = {}
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        cache = {"block_size": cc.block_size,
                 "num_blocks": getattr(cc, "num_gpu_blocks", None),
                 "kv_cache_dtype": str(cc.cache_dtype)}
        sc = llm.llm_engine.vllm_config.scheduler_config
        cache["max_num_seqs"] = sc.max_num_seqs
        cache["max_num_batched_tokens"] = sc.max_num_batched_tokens
        comp = llm.llm_engine.vllm_config.compilation_config
        cache["compilation_mode"] = str(comp.mode)
    except Exception as e:  # noqa: BLE001 - internals differ between versions
        cache["engine_config_error"] = repr(e)

    expected = args.num_requests * args.output_len
    result = {
        "peer": "vllm-cpu",
        "label": args.label,
        "requests": args.num_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "generated_tokens": best["generated_tokens"],
        "expected_tokens": expected,
        "elapsed_s": best["elapsed_s"],
        "generated_tok_s": best["generated_tok_s"],
        "total_tok_s": round((best["generated_tokens"] + args.num_requests
                              * args.prompt_len) / best["elapsed_s"], 2),
        "runs": runs,
        "startup_s": round(startup_s, 1),
        "warmup_s": round(warmup_s, 1),
        "dtype": args.dtype,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "rss_mib_after": rss,
        # 1-minute load average around the timed runs: a value well above
        # the worker's thread count means something else shared the CPUs.
        "loadavg_1m": {"before": load_before, "after": load_after},
        "model": {k: model_cfg.get(k) for k in (
            "architectures", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_hidden_layers", "num_local_experts", "num_experts_per_tok",
            "vocab_size", "tie_word_embeddings")},
        "vllm_settings": {
            "load_format": engine_kwargs["load_format"],
            "skip_tokenizer_init": True,
            "max_model_len": max_model_len,
            "enforce_eager": args.enforce_eager,
            "sampling": {"temperature": 0.0, "ignore_eos": True},
            "seed": args.seed,
            "env": settings_env,
            **cache,
        },
    }
    line = json.dumps(result, sort_keys=False)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)
    if best["generated_tokens"] != expected:
        print(f"offline_bench.py: WARNING generated {best['generated_tokens']} "
              f"tokens, expected {expected}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
