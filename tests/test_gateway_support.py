"""Helpers the gateway tests share (no tests here): an in-process server and metric parsing.

`LocalServer` runs the FastAPI app over a real `AsyncEngine` under uvicorn in a thread, on 127.0.0.1
and a free port: real HTTP (streaming, disconnects, the openai client) without Ray.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from typing_extensions import Self

from services.engine.async_engine import AsyncEngine, LocalEngineClient
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.gateway.auth import ApiKeys
from services.gateway.config import AppConfig
from services.gateway.openai_api import build_context, create_app

REFERENCE_TINY = Path(__file__).resolve().parents[1] / ".." / "shared" / "grok1-reference" / "tiny"


def reference_tiny_or_skip() -> Path:
    if not (REFERENCE_TINY / "ckpt-0").is_dir():
        pytest.skip(f"Grok-1 reference checkpoint not found at {REFERENCE_TINY.resolve()}; golden serving "
                    "tests skipped")
    return REFERENCE_TINY.resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, config: AppConfig, keys: ApiKeys | None = None):
        self.client = LocalEngineClient(AsyncEngine(LLMEngine(config.engine)))
        self.context = build_context(config, self.client, keys)
        self.app = create_app(self.context)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="test-gateway", daemon=True)

    @property
    def engine(self) -> LLMEngine:
        return self.client.engine.engine

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 120  # generous: a loaded machine starts uvicorn slowly
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def tiny_config(**overrides) -> AppConfig:
    """The tiny preset with a short context, so generated requests stay cheap."""
    engine = EngineConfig(model="tiny", max_model_len=128, kv_cache_memory_bytes=8 << 20)
    return AppConfig(engine=engine, **overrides)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def openai_client(server: LocalServer):
    """The unmodified openai client against `server`: no retries, a generous timeout."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def assert_rejected(server: LocalServer, field: str, value) -> None:
    """Completions and chat both answer 400 naming `field` when a request sets it to `value`."""
    import httpx

    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        response = httpx.post(server.url + path, json={**body, "max_tokens": 1, field: value}, timeout=120)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field, response.text
