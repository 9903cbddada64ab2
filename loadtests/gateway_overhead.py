"""Latency the gateway adds: the same short request through HTTP + Ray Serve and as a direct engine call.

    python -m loadtests.gateway_overhead --requests 100

Both paths run the `tiny` preset with the same engine settings, one request at a time (max_tokens 1,
so the model's share is one small prefill); the difference of the latency percentiles is what the
HTTP server, the Serve proxy, the gateway deployment and the streaming handle cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def direct(n: int) -> list[float]:
    engine = AsyncEngine(LLMEngine(EngineConfig(model="tiny", kv_cache_memory_bytes=128 << 20)))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    out = []
    for i in range(n + 5):
        started = time.perf_counter()
        async for _ in engine.generate(PROMPT, params, f"d{i}"):
            pass
        if i >= 5:  # warm-up
            out.append(time.perf_counter() - started)
    await engine.shutdown()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def over_http(n: int) -> list[float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", "tiny", "--port",
                               str(port), "--kv-cache-memory-bytes", str(128 << 20)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            for _ in range(240):
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError("the server did not come up")
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
            out = []
            for i in range(n + 5):
                started = time.perf_counter()
                response = client.post(f"{url}/v1/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
                if i >= 5:
                    out.append(time.perf_counter() - started)
            return out
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    rows = {"direct engine call": asyncio.run(direct(args.requests)), "HTTP + Ray Serve": over_http(args.requests)}
    summary = {name: {q: round(1000 * percentile(v, p), 2) for q, p in (("p50_ms", 0.5), ("p99_ms", 0.99))}
               | {"mean_ms": round(1000 * statistics.mean(v), 2)} for name, v in rows.items()}
    summary["added by the gateway"] = {k: round(summary["HTTP + Ray Serve"][k] - summary["direct engine call"][k], 2)
                                       for k in ("p50_ms", "p99_ms", "mean_ms")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
