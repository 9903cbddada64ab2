"""`grok-serve`: command-line entry point."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"error: --token-ids must be comma-separated integers, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from services.model import load_model
    from services.model.tokenizer import IncrementalDetokenizer, load_tokenizer

    started = time.perf_counter()
    model = load_model(args.model, args.dtype, load_format=args.load_format, seed=args.seed)
    model_dir = Path(args.model) if Path(args.model).is_dir() else None
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    if args.token_ids is not None:
        prompt = _token_ids(args.token_ids)
    else:
        prompt = tokenizer.encode(args.prompt)  # no BOS, as the reference's runner encodes prompts
    loaded = time.perf_counter()
    out = model.generate(prompt, args.max_tokens, temperature=args.temperature, seed=args.seed,
                         stop_token_ids=() if args.ignore_eos else (model.config.eos_token_id,))
    done = time.perf_counter()
    if args.token_ids is not None:
        print(",".join(map(str, out)))
    else:
        detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
        print(args.prompt + detok.add(out) + detok.finish())
    print(f"[{args.model}: {len(prompt)} prompt + {len(out)} generated tokens, load {loaded - started:.2f} s, "
          f"generate {done - loaded:.3f} s]", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from services.model.convert import convert_release

    started = time.perf_counter()
    info = convert_release(Path(args.source), Path(args.dest), int(args.shard_gb * (1 << 30)))
    print(f"wrote {info['tensors']} tensors ({info['bytes'] / 1e9:.3f} GB) in {info['shards']} shard(s) "
          f"to {args.dest} in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    import json

    from services.engine import benchmark

    workload = benchmark.Workload(args.num_requests, args.prompt_len, args.output_len, args.seed)
    if args.peer == "vllm-plugin":
        args.model = str(benchmark.benchmark_checkpoint(args.model))  # both engines load these weights
    rows = [benchmark.run_ours(args.model, args.dtype, workload, max_num_seqs=args.max_num_seqs,
                               max_num_batched_tokens=args.max_num_batched_tokens,
                               kv_cache_memory_bytes=int(args.kv_cache_gb * (1 << 30)))]
    print(json.dumps(rows[0]), flush=True)
    if args.peer != "none":
        rows.append(benchmark.run_vllm(Path(args.peer_python), workload, args.model, args.dtype,
                                       plugin=args.peer == "vllm-plugin"))
        print(json.dumps(rows[1]), flush=True)
        ours, peer = rows[0]["output_tok_s"], rows[1]["generated_tok_s"]
        print(f"generated tok/s: grok-serve {ours}, {rows[1]['engine']} {peer}, ratio {ours / peer:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grok-serve", description="Serve the Grok-1 model.")
    sub = parser.add_subparsers(dest="command", required=True)

    from services.gateway.launcher import add_up_parser
    add_up_parser(sub)

    gen = sub.add_parser("generate", help="generate a continuation of one prompt")
    gen.add_argument("--model", default="tiny", help="preset (tiny, cpu-bench, grok-1) or checkpoint directory")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="The answer to life the universe and everything is")
    src.add_argument("--token-ids", help="prompt as comma-separated token ids (prints ids)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--load-format", default="auto", choices=["auto", "release", "safetensors", "hf", "dummy"])
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="convert release pickles to safetensors shards")
    conv.add_argument("source", help="release checkpoint directory (holding ckpt-0/), or a preset name "
                                      "(writes its random weights)")
    conv.add_argument("dest", help="output directory")
    conv.add_argument("--shard-gb", type=float, default=4.0)
    conv.set_defaults(func=cmd_convert)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    off = bench.add_parser("offline", help="batch throughput through the engine (optionally vs vLLM)")
    off.add_argument("--model", default="cpu-bench")
    off.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    off.add_argument("--num-requests", type=int, default=64)
    off.add_argument("--prompt-len", type=int, default=128)
    off.add_argument("--output-len", type=int, default=128)
    off.add_argument("--seed", type=int, default=0)
    off.add_argument("--max-num-seqs", type=int, default=64)
    off.add_argument("--max-num-batched-tokens", type=int, default=2048)
    off.add_argument("--kv-cache-gb", type=float, default=2.0)
    off.add_argument("--peer", choices=["none", "vllm", "vllm-plugin"], default="none",
                     help="vllm: vLLM's Mixtral with the same dimensions; vllm-plugin: this model in vLLM "
                          "through services/vllm_plugin, on the same weights")
    off.add_argument("--peer-python", default=".venv-vllm/bin/python")
    off.add_argument("--json-out")
    off.set_defaults(func=cmd_bench_offline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
