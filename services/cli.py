"""`grok-serve`: command-line entry point (`python -m services.cli` where the script is not installed).

`grok-serve up` runs the Ray Serve application until Ctrl-C or SIGTERM: it starts a local Ray instance,
or joins the cluster named by RAY_ADDRESS (Ray's own convention, read by `ray.init`), serves the app on
the configured address (127.0.0.1:8000 by default, the `tiny` preset with random weights on CPU), prints
the URLs and blocks. On a signal it drains: the gateways refuse new requests with 503 (and report
unhealthy) while the streams they serve finish, for up to the deployments' `graceful_shutdown_timeout_s`;
then it shuts Serve down and disconnects from Ray.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services.engine.config import PLACEMENT_STRATEGIES
from services.gateway.config import AppConfig, load_config

APP_NAME = "grok-serve"

# flag destination -> option path in AppConfig
_OVERRIDES = {
    "host": "host", "port": "port", "model": "engine.model", "dtype": "engine.dtype",
    "load_format": "engine.load_format", "engine": "engine.backend", "max_model_len": "engine.max_model_len",
    "max_num_seqs": "engine.max_num_seqs", "kv_cache_memory_bytes": "engine.kv_cache_memory_bytes",
    "served_model_name": "served_model_name", "chat_template": "chat_template",
    "api_key_env": "auth.api_key_env", "api_key_file": "auth.api_key_file",
    "open_health": "auth.open_health", "open_metrics": "auth.open_metrics",
    "max_body_bytes": "max_body_bytes", "num_replicas": "engine_deployment.num_replicas",
    "engine_num_cpus": "engine_deployment.num_cpus",
    "max_ongoing_requests": "engine_deployment.max_ongoing_requests",
    "max_queued_requests": "engine_deployment.max_queued_requests", "grpc_port": "grpc_port",
    "parallel_size": "engine.parallel_size", "placement_strategy": "engine.placement_strategy",
    "max_replicas_per_node": "engine_deployment.max_replicas_per_node",
}


def add_up_parser(subparsers: Any) -> argparse.ArgumentParser:
    up = subparsers.add_parser("up", help="serve the OpenAI-compatible API on Ray Serve until Ctrl-C",
                               description="Serve the model (OpenAI-compatible HTTP API) on Ray Serve. "
                                           "Flags override the --config file, which overrides the defaults.")
    up.add_argument("--config", help="YAML configuration file (see deploy/local-cpu.yaml)")
    up.add_argument("--host", help="address to bind (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="HTTP port (default 8000)")
    up.add_argument("--model", help="preset (tiny, cpu-bench, grok-1) or checkpoint directory (default tiny)")
    up.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    up.add_argument("--load-format", choices=["auto", "release", "safetensors", "hf", "dummy"])
    up.add_argument("--engine", choices=["native", "vllm"],
                    help="native (default), or vLLM with the Grok-1 plugin (needs vLLM installed and a "
                         "checkpoint directory; docs/vllm_plugin.md)")
    up.add_argument("--max-model-len", type=int)
    up.add_argument("--max-num-seqs", type=int)
    up.add_argument("--kv-cache-memory-bytes", type=int)
    up.add_argument("--served-model-name", help="the name clients put in `model`")
    up.add_argument("--chat-template", help="Jinja2 chat template file")
    up.add_argument("--api-key-env", help="environment variable holding comma-separated API keys")
    up.add_argument("--api-key-file", help="file with one API key per line")
    up.add_argument("--open-health", action=argparse.BooleanOptionalAction, default=None,
                    help="serve /health without an API key (default: yes)")
    up.add_argument("--open-metrics", action=argparse.BooleanOptionalAction, default=None,
                    help="serve /metrics without an API key (default: yes)")
    up.add_argument("--max-body-bytes", type=int)
    up.add_argument("--num-replicas", type=int, help="engine replicas (model instances)")
    up.add_argument("--engine-num-cpus", type=float, help="CPUs reserved per engine replica")
    up.add_argument("--max-ongoing-requests", type=int, help="per engine replica")
    up.add_argument("--max-queued-requests", type=int, help="beyond this, requests get 429")
    up.add_argument("--grpc-port", type=int, help="also serve gRPC on this port")
    up.add_argument("--parallel-size", type=int, help="ranks per engine replica (one model instance)")
    up.add_argument("--placement-strategy", choices=PLACEMENT_STRATEGIES,
                    help="where the ranks of a replica go: STRICT_PACK one node (default), PACK one node "
                         "when it fits, STRICT_SPREAD one rank per node, SPREAD over nodes as they allow")
    up.add_argument("--max-replicas-per-node", type=int,
                    help="at most this many engine replicas per Ray node (1: one per node); one-rank "
                         "replicas only")
    up.set_defaults(func=cmd_up)
    return up


def config_from_args(args: argparse.Namespace) -> AppConfig:
    overrides = {path: getattr(args, dest) for dest, path in _OVERRIDES.items()
                 if getattr(args, dest, None) is not None}
    return load_config(getattr(args, "config", None), overrides)


def _wait_for_signal() -> int:
    stop = threading.Event()
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received[0]


def cmd_up(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # invalid options fail here, before Ray starts
    import ray
    from ray import serve

    from services.serve_app import build_application
    from services.serve_metrics import drain_gateways
    from services.serve_start import start_serve

    if not config.auth.enabled:
        print("warning: no API keys configured (--api-key-env / --api-key-file): the API is open to anyone "
              f"who can reach {config.host}:{config.port}", file=sys.stderr)
    # On a shared cluster only our application is removed at the end; a local Ray goes away entirely.
    joining = bool(os.environ.get("RAY_ADDRESS"))
    from services.gateway.proxy import HEADER_TIMEOUT_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV

    # Serve's proxy reads its middleware from its environment: a local Ray started here inherits it.
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    os.environ[HEADER_TIMEOUT_ENV] = str(config.header_read_timeout_s)
    # Without RAY_ADDRESS, a Ray of our own even where `ray start` left one running on this machine
    # (plain ray.init() would join that one, and shutting down would then take its Serve with us).
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True)
    try:
        start_serve({"host": config.host, "port": config.port, "keep_alive_timeout_s": config.keep_alive_timeout_s})
        serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)
        base = f"http://{config.host}:{config.port}"
        print(f"grok-serve is up: model {config.model_name!r}\n"
              f"  OpenAI API   {base}/v1  (chat/completions, completions, models)\n"
              f"  health       {base}/health\n"
              f"  metrics      {base}/metrics\n"
              f"  API docs     {base}/docs\n"
              + (f"  gRPC         {config.host}:{config.grpc_port}\n" if config.grpc_port is not None else "")
              + "Press Ctrl-C to stop.", flush=True)
        signum = _wait_for_signal()
        grace_s = max(config.gateway_deployment.graceful_shutdown_timeout_s,
                      config.engine_deployment.graceful_shutdown_timeout_s)
        print(f"received {signal.Signals(signum).name}: draining (new requests get 503; open streams have "
              f"up to {grace_s:g} s)", file=sys.stderr, flush=True)
        try:
            left = drain_gateways(APP_NAME, grace_s)
            print(f"drained ({left} streams cut)" if left else "drained", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - shutting down regardless; Serve still stops gracefully
            print(f"drain failed ({exc!r}): stopping", file=sys.stderr, flush=True)
    finally:
        try:
            # Deleting the app first lets its replicas drain in-flight streams through the still-running
            # HTTP proxy; serve.shutdown() alone stops the proxy at once and cuts them.
            serve.delete(APP_NAME)
            if not joining:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


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
