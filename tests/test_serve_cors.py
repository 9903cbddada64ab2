"""CORS behind Ray Serve's HTTP proxy: the gateway deployment's app answers browsers' preflights and
marks its answers for the allowed origin, exactly as in process (tests/test_gateway_cors.py)."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve_support import served_app
from tests.test_gateway_cors import OTHER, PAGE, preflight

ray = pytest.importorskip("ray")

from services.gateway.config import load_config

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def served():
    config = load_config(None, {
        "cors": {"allowed_origins": [PAGE]},
        "engine": {"model": "tiny", "kv_cache_memory_bytes": 8 << 20, "max_model_len": 128},
        "engine_deployment": {"num_cpus": 0.1, "graceful_shutdown_timeout_s": 5},
        "gateway_deployment": {"num_cpus": 0.1, "graceful_shutdown_timeout_s": 5},
    })
    with served_app(config, "grok-serve-cors") as url:
        yield url


def test_cors_through_the_serve_proxy(served):
    answer = preflight(served + "/v1/chat/completions", PAGE)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == PAGE
    refused = preflight(served + "/v1/chat/completions", OTHER)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    with openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=120,
                       default_headers={"Origin": PAGE}) as client:
        raw = client.completions.with_raw_response.create(model="tiny", prompt="Hi", max_tokens=2)
        assert raw.parse().usage.completion_tokens >= 1
        assert raw.headers["access-control-allow-origin"] == PAGE
        # Serve's proxy sets X-Request-Id itself; the page may read it.
        assert raw.headers["x-request-id"] and "x-request-id" in raw.headers["access-control-expose-headers"].lower()
    plain = httpx.get(served + "/v1/models", headers={"Origin": OTHER}, timeout=120)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
