"""`grok-serve up`: run the Ray Serve application until Ctrl-C or SIGTERM.

Starts a local Ray instance, or joins the cluster named by RAY_ADDRESS (Ray's own convention, read by
`ray.init`), serves the app on the configured address (127.0.0.1:8000 by default, the `tiny` preset with
random weights on CPU), prints the URLs and blocks; on a signal it shuts Serve down (in-flight streams get
`graceful_shutdown_timeout_s`) and disconnects from Ray.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

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

    if not config.auth.enabled:
        print("warning: no API keys configured (--api-key-env / --api-key-file): the API is open to anyone "
              f"who can reach {config.host}:{config.port}", file=sys.stderr)
    # On a shared cluster only our application is removed at the end; a local Ray goes away entirely.
    joining = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
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
        print(f"received {signal.Signals(signum).name}: shutting down", file=sys.stderr, flush=True)
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


if __name__ == "__main__":
    # `python -m services.gateway.launcher up ...`: the grok-serve CLI, for environments without its script.
    from services.cli import main

    sys.exit(main())
