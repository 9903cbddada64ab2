"""Bad input and access control: each rejection has the right status and an OpenAI error body, a
bounded schemathesis run finds no server error, and the server keeps serving afterwards."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.openapi import from_dict

from services.gateway.auth import ApiKeys
from tests.test_gateway_support import LocalServer, tiny_config

pytestmark = pytest.mark.timeout(180)

KEY = "sk-test-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096


@pytest.fixture(scope="module")
def server():
    from services.gateway.config import AuthConfig

    config = tiny_config(max_body_bytes=LIMIT, auth=AuthConfig(api_key_env="UNUSED", open_metrics=False))
    with LocalServer(config, keys=ApiKeys([KEY, "sk-test-2"])) as s:
        yield s


def post(server, path, body, headers=AUTH, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content,
                      headers={"Content-Type": "application/json", **headers}, **kwargs)


def assert_error(response, status, param="unset", code="unset"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "unset":
        assert error["param"] == param, error
    if code != "unset":
        assert error["code"] == code, error
    return error


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}

BAD_BODIES = [
    # (path, body, param)
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "2"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "n": True}, "n"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 17}, "n"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"5": 101.0}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [[]], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [1, -1], "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/detokenize", {"tokens": [1, 1 << 40]}, "tokens"),
]


@pytest.mark.parametrize("path, body, param", BAD_BODIES,
                         ids=[f"{p}:{json.dumps(b) if isinstance(b, dict) else b!r}"[:60] for p, b, _ in BAD_BODIES])
def test_bad_bodies_are_400_naming_the_param(server, path, body, param):
    assert_error(post(server, path, body), 400, param=param)


def test_invalid_utf8_is_400(server):
    assert_error(post(server, "/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}'), 400,
                 code="invalid_encoding")


def test_context_length(server):
    over = post(server, "/v1/completions", {"prompt": [5] * 130, "max_tokens": 2})
    assert "maximum context length is 128" in assert_error(over, 400, param="prompt",
                                                            code="context_length_exceeded")["message"]
    assert_error(post(server, "/v1/completions", {"prompt": [5] * 100, "max_tokens": 40}), 400,
                 param="max_tokens", code="context_length_exceeded")
    # Without max_tokens, chat fills the rest of the context.
    ok = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}],
                                               "temperature": 0, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == 128


def test_unknown_model_route_and_method(server):
    assert_error(post(server, "/v1/completions", {**COMPLETION, "model": "gpt-4"}), 404, param="model",
                 code="model_not_found")
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(server.url + "/v1/completions", headers=AUTH), 405)


def test_oversized_body_is_413(server):
    big = {"prompt": "x" * LIMIT, "max_tokens": 1}
    assert_error(post(server, "/v1/completions", big), 413, code="body_too_large")

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(LIMIT // 512 + 2):
            yield b" " * 512

    response = httpx.post(server.url + "/v1/completions", content=chunks(),
                          headers={"Content-Type": "application/json", **AUTH})
    assert_error(response, 413)


def test_api_keys(server):
    missing = post(server, "/v1/completions", COMPLETION, headers={})
    assert_error(missing, 401, code="invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(post(server, "/v1/completions", COMPLETION, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(post(server, "/v1/completions", COMPLETION, headers={"Authorization": f"Basic {KEY}"}), 401)
    assert post(server, "/v1/completions", COMPLETION, headers={"Authorization": "Bearer sk-test-2"}).status_code == 200
    # Unknown routes do not reveal themselves without a key.
    assert_error(httpx.get(server.url + "/v1/nothing"), 401)
    # Health is open; metrics is not in this configuration.
    assert httpx.get(server.url + "/health").status_code == 200
    assert_error(httpx.get(server.url + "/metrics"), 401)
    assert httpx.get(server.url + "/metrics", headers=AUTH).status_code == 200


def _fuzz(server, path: str, mode: GenerationMode, examples: int) -> list:
    schema = from_dict(httpx.get(server.url + "/openapi.json", headers=AUTH).json())
    strategy = schema[path]["POST"].as_strategy(generation_mode=mode)
    failures = []

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=server.url, headers=AUTH, timeout=60)
        if response.status_code >= 500 or (
                response.status_code != 200 and "error" not in response.json()):
            failures.append((repr(case.body)[:300], response.status_code, response.text[:300]))

    run()
    return failures


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_schemathesis_finds_no_server_error(server, path):
    failures = _fuzz(server, path, GenerationMode.POSITIVE, 25) + _fuzz(server, path, GenerationMode.NEGATIVE, 25)
    assert not failures, failures[:3]


def test_still_serving_after_all_of_it(server):
    out = post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_dead_engine_is_503(server):
    # Last in this module: the engine stays dead.
    server.client.engine.error = RuntimeError("simulated failure")
    health = httpx.get(server.url + "/health")
    assert_error(health, 503, code="engine_unavailable")
    assert int(health.headers["retry-after"]) >= 1
    assert_error(post(server, "/v1/completions", COMPLETION), 503, code="engine_unavailable")
    streamed = post(server, "/v1/chat/completions", {**CHAT, "stream": True})
    assert_error(streamed, 503)
