"""Soak: hours of mixed, partly hostile traffic against one server, watching what must not drift.

    python -m loadtests.soak --duration-s 1800                  # starts its own server (tiny preset)
    python -m loadtests.soak --url http://host:8000 --engine-pid PID --api-key KEY --duration-s 1800

Traffic, from `--concurrency` workers, each request drawn from `KINDS`: chat streams read to the end,
completion streams abandoned after their first event (client disconnects), several prompts with n > 1,
long stop lists within the limits, and bad requests (over a limit, malformed JSON, wrong types, a
text/plain body, a non-UTF-8 X-Request-Id). The engine's RSS is sampled every `--sample-every-s`
(a minute by default): the engine process is a child of this script, or `--engine-pid` on this machine.

It passes when no answer was a 5xx (or a transport error), every bad request got its 4xx, and, once the
traffic has stopped, the engine holds no request and no KV block; and, for a run longer than the warm-up,
when the RSS after `--warmup-s` stayed within `--rss-bound-mb`. The report (JSON) goes to stdout and,
with `--out`, to a file; the exit status is 0 for a pass.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

KINDS = {  # kind: weight
    "stream": 4, "disconnect": 3, "multi_n": 2, "long_stop": 2, "over_limit": 1, "malformed": 1,
    "wrong_type": 1, "text_plain": 1, "bad_request_id": 1,
}
EXPECTED = {"over_limit": 400, "malformed": 400, "wrong_type": 400, "text_plain": 415}


@dataclass
class Report:
    duration_s: float = 0.0
    requests: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> status -> count
    server_errors: int = 0  # 5xx and transport failures
    wrong_status: int = 0  # a bad request that did not get its 4xx
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    rss_growth_mb: float | None = None  # max - min after the warm-up
    rss_bound_mb: float = 0.0
    leaked: dict[str, float] = field(default_factory=dict)  # what the engine still holds at the end
    passed: bool = False


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int) -> None:
    """The server a local soak runs against: the HTTP app over an in-process engine, one process."""
    import uvicorn

    from services.engine.async_engine import AsyncEngine, LocalEngineClient
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.gateway.config import AppConfig
    from services.gateway.openai_api import build_context, create_app

    config = AppConfig(engine=EngineConfig(model="tiny", max_model_len=256, kv_cache_memory_bytes=16 << 20),
                       port=port)
    app = create_app(build_context(config, LocalEngineClient(AsyncEngine(LLMEngine(config.engine)))))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


def _request(kind: str, rng: random.Random) -> tuple[str, dict, bytes, bool]:
    """(path, headers, body, stream) for one request of `kind`."""
    prompt = " ".join(rng.choice(("the", "a", "grok", "serve", "token", "cache")) for _ in range(rng.randint(2, 12)))
    headers = {"Content-Type": "application/json"}
    if kind == "stream":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(8, 48),
                "stream": True, "stream_options": {"include_usage": True}}
        return "/v1/chat/completions", headers, json.dumps(body).encode(), True
    if kind == "disconnect":
        body = {"prompt": prompt, "max_tokens": 128, "ignore_eos": True, "stream": True}
        return "/v1/completions", headers, json.dumps(body).encode(), True
    if kind == "multi_n":
        body = {"prompt": [prompt, prompt[::-1] or "x"], "n": rng.choice((2, 4)), "max_tokens": 16,
                "temperature": 0.8, "seed": rng.randrange(1 << 30)}
        return "/v1/completions", headers, json.dumps(body).encode(), False
    if kind == "long_stop":  # as long as the default limits allow: 64 strings, 4096 characters
        stop = [f"{i:03d}" + "q" * 60 for i in range(64)]
        body = {"prompt": prompt, "max_tokens": 32, "ignore_eos": True, "stop": stop, "logprobs": 2}
        return "/v1/completions", headers, json.dumps(body).encode(), False
    if kind == "over_limit":
        body = {"prompt": prompt, "max_tokens": 8, "stop": [f"s{i}" for i in range(5000)]}
        return "/v1/completions", headers, json.dumps(body).encode(), False
    if kind == "malformed":
        return "/v1/completions", headers, b'{"prompt": "unterminated', False
    if kind == "wrong_type":
        return "/v1/chat/completions", headers, json.dumps({"messages": "hi", "n": "2"}).encode(), False
    if kind == "text_plain":
        return "/v1/completions", {"Content-Type": "text/plain"}, json.dumps({"prompt": prompt}).encode(), False
    if kind == "bad_request_id":
        body = {"prompt": prompt, "max_tokens": 4}
        return "/v1/completions", {**headers, "X-Request-Id": "<b>x y</b>"}, json.dumps(body).encode(), False
    raise ValueError(kind)


class Soak:
    def __init__(self, url: str, api_key: str, concurrency: int, seed: int):
        self.url, self.concurrency = url, concurrency
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rng = random.Random(seed)
        self.counts: dict[str, Counter] = {kind: Counter() for kind in KINDS}
        self.server_errors = 0
        self.wrong_status = 0

    async def one(self, client: httpx.AsyncClient, kind: str) -> None:
        path, headers, body, stream = _request(kind, self.rng)
        try:
            async with client.stream("POST", self.url + path, content=body, headers={**headers, **self.auth}) as r:
                if stream and kind == "disconnect":
                    async for _ in r.aiter_lines():
                        break  # leaving the block closes the connection mid-stream
                else:
                    await r.aread()
                status = r.status_code
                if kind == "bad_request_id" and status == 200:
                    rid = r.headers.get("x-request-id", "")
                    if r.json().get("id") != f"cmpl-{rid}" or rid == "<b>x y</b>":
                        self.wrong_status += 1
        except httpx.HTTPError as exc:
            self.counts[kind][type(exc).__name__] += 1
            self.server_errors += 1
            return
        self.counts[kind][str(status)] += 1
        if status >= 500:
            self.server_errors += 1
        elif status != EXPECTED.get(kind, status if status in (200, 429) else 200):
            self.wrong_status += 1

    async def worker(self, client: httpx.AsyncClient, until: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < until:
            await self.one(client, self.rng.choices(kinds, weights)[0])

    async def run(self, duration_s: float, sample_every_s: float, pid: int | None) -> list[tuple[float, float]]:
        start = time.monotonic()
        until = start + duration_s
        samples: list[tuple[float, float]] = []

        async def sample() -> None:
            while True:
                if pid is not None:
                    samples.append((round(time.monotonic() - start, 1), round(_rss_mb(pid), 1)))
                await asyncio.sleep(sample_every_s)

        sampler = asyncio.ensure_future(sample())
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30), limits=limits) as client:
                await asyncio.gather(*(self.worker(client, until) for _ in range(self.concurrency)))
        finally:
            sampler.cancel()
        if pid is not None:
            samples.append((round(time.monotonic() - start, 1), round(_rss_mb(pid), 1)))
        return samples


def engine_state(url: str, api_key: str) -> dict[str, float]:
    """The engine's live requests and KV usage, from /metrics."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(url + "/metrics", headers=headers, timeout=60).text
    wanted = {"grok_serve:num_requests_running": "running", "grok_serve:num_requests_waiting": "waiting",
              "grok_serve:kv_cache_usage_perc": "kv_usage"}
    state = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                state[wanted[s.name]] += s.value
    return state


def _wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy within {timeout_s} s")


def soak(duration_s: float, *, url: str | None = None, engine_pid: int | None = None, api_key: str = "",
         concurrency: int = 8, sample_every_s: float = 60.0, warmup_s: float = 300.0,
         rss_bound_mb: float = 32.0, seed: int = 0) -> Report:
    server = None
    if url is None:
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "loadtests.soak", "--serve-port", str(port)],
                                  cwd=Path(__file__).resolve().parents[1])
        url, engine_pid = f"http://127.0.0.1:{port}", server.pid
    try:
        _wait_for(url, 300)
        runner = Soak(url, api_key, concurrency, seed)
        started = time.monotonic()
        samples = asyncio.run(runner.run(duration_s, sample_every_s, engine_pid))
        report = Report(duration_s=round(time.monotonic() - started, 1), server_errors=runner.server_errors,
                        wrong_status=runner.wrong_status, rss_mb=samples, rss_bound_mb=rss_bound_mb,
                        requests={kind: dict(c) for kind, c in runner.counts.items()})
        # Aborts of abandoned streams are applied between steps: give them a moment to land.
        deadline = time.monotonic() + 120
        while True:
            state = engine_state(url, api_key)
            if not any(state.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        report.leaked = {k: v for k, v in state.items() if v}
        settled = [mb for t, mb in samples if t >= warmup_s]
        if len(settled) >= 2:
            report.rss_growth_mb = round(max(settled) - min(settled), 1)
        report.passed = (report.server_errors == 0 and report.wrong_status == 0 and not report.leaked
                         and (report.rss_growth_mb is None or report.rss_growth_mb <= rss_bound_mb))
        return report
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=1800)
    parser.add_argument("--url", help="a running server (default: start one with the tiny preset)")
    parser.add_argument("--engine-pid", type=int, help="the engine's process, to sample its RSS (with --url)")
    parser.add_argument("--api-key", default=os.environ.get("GROK_SERVE_API_KEY", ""))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-every-s", type=float, default=60)
    parser.add_argument("--warmup-s", type=float, default=300)
    parser.add_argument("--rss-bound-mb", type=float, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_port is not None:
        _serve(args.serve_port)
        return 0
    report = soak(args.duration_s, url=args.url, engine_pid=args.engine_pid, api_key=args.api_key,
                  concurrency=args.concurrency, sample_every_s=args.sample_every_s, warmup_s=args.warmup_s,
                  rss_bound_mb=args.rss_bound_mb, seed=args.seed)
    text = json.dumps(asdict(report), indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
