"""Hostile input against a real local server: per-request limits, all-or-nothing admission, request
ids, slow bodies, content types, HEAD probes, and gRPC's undecodable messages and pushback.

Each test is the regression test of one defect a black-box probe found (issue "Hostile input").
"""
from __future__ import annotations

import asyncio
import json
import random
import socket

import grpc
import httpx
import pytest

from services.engine.api import QueueFullError, RequestLimits, check_limits
from services.engine.text_stream import TextStream
from services.gateway.auth import ApiKeys
from services.gateway.config import AuthConfig
from services.gateway.grpc_server import RETRY_PUSHBACK_KEY
from services.gateway.proto import grok_serve_pb2 as pb
from tests.step_gate import StepGate
from tests.test_gateway_support import LocalServer, tiny_config, wait_until
from tests.test_grpc import AUTH, KEY, FailingClient, Served

pytestmark = pytest.mark.timeout(240)

HTTP_AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    # A body limit well above the stop lists below: the limits, not the body size, must refuse them.
    config = tiny_config(max_body_bytes=4 << 20, body_read_timeout_s=1.0,
                         auth=AuthConfig(api_key_env="UNUSED"))
    with LocalServer(config, keys=ApiKeys([KEY])) as s:
        yield s


def post(server, path, body, headers=None, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, content=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json", **HTTP_AUTH, **(headers or {})},
                      timeout=120, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def idle(server) -> bool:
    engine = server.engine
    return not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# --- 1. stop strings ---------------------------------------------------------------------------------
def test_a_huge_stop_list_is_refused_before_anything_runs(server):
    generated = server.engine.stats.generation_tokens
    body = {"prompt": [1, 2, 3], "max_tokens": 512, "n": 16, "ignore_eos": True,
            "stop": [f"zq{i:05d}" for i in range(80000)]}
    error = error_of(post(server, "/v1/completions", body), 400)
    assert error["param"] == "stop" and error["code"] == "limit_exceeded"
    assert "max_stop_strings" in error["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 3000, "y" * 3000]}
    error = error_of(post(server, "/v1/chat/completions", chat), 400)
    assert error["param"] == "stop" and "max_stop_chars" in error["message"]
    assert server.engine.stats.generation_tokens == generated


def test_stop_matching_agrees_with_a_plain_search():
    class Letters:  # one character per token id
        def add(self, ids):
            return "".join(chr(ord("a") + i) for i in ids)

        def finish(self):
            return ""

    rng = random.Random(7)
    for _ in range(200):
        stops = tuple({"".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                       for _ in range(rng.randint(1, 30))})
        ids = [rng.randrange(3) for _ in range(40)]
        stream, text, emitted, found = TextStream(Letters(), stops), "", 0, None
        for i in range(0, len(ids), 3):
            chunk = ids[i:i + 3]
            text += Letters().add(chunk)
            hits = [(j, s) for s in stops if (j := text.find(s, emitted)) >= 0]
            expected = min(hits) if hits else None
            got = stream.add(chunk)
            if expected is not None:
                assert (stream.stop_at, got) == expected
                found = got
                break
            assert got is None
            stream.emit(False)
            emitted = stream.emitted_chars
        assert found is not None or stream.stop_at is None


def test_limits_name_the_field_and_the_limit():
    limits = RequestLimits(max_sequences=8, max_logprobs=5, max_logit_bias=2, max_messages=3)
    assert check_limits(limits, num_prompts=3, n=3).param == "prompt"
    assert check_limits(limits, n=9).param == "n"
    assert check_limits(limits, logprobs=6, names={"logprobs": "top_logprobs"}).param == "top_logprobs"
    assert "limits.max_logit_bias" in check_limits(limits, logit_bias=3).message
    assert check_limits(limits, messages=4).param == "messages"
    assert check_limits(limits, stop=("a",) * 8, num_prompts=2, n=4, logprobs=5, logit_bias=2, messages=3) is None
    with pytest.raises(ValueError, match="max_logprobs"):
        RequestLimits(max_logprobs=21)


def test_other_limits_over_http(server):
    chat = {"messages": [{"role": "user", "content": "hi"}] * 1025, "max_tokens": 1}
    assert "max_messages" in error_of(post(server, "/v1/chat/completions", chat), 400)["message"]
    bias = {"prompt": "hi", "max_tokens": 1, "logit_bias": {str(i): 1.0 for i in range(301)}}
    assert error_of(post(server, "/v1/completions", bias), 400)["param"] == "logit_bias"


# --- 2. many prompts, all or nothing -----------------------------------------------------------------
def test_prompts_times_n_is_capped(server):
    generated = server.engine.stats.generation_tokens
    body = {"prompt": [[1, 2, 3]] * 300, "max_tokens": 16, "n": 16, "ignore_eos": True}
    error = error_of(post(server, "/v1/completions", body), 400)
    assert error["param"] == "prompt" and "max_sequences" in error["message"]
    assert server.engine.stats.generation_tokens == generated


class RefuseThird:
    """The engine client, except that the third request of a burst finds the queue full."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompt_ids, params, request_id):
        self.calls += 1
        if self.calls == 3:
            return self._full()
        return self.inner.generate(prompt_ids, params, request_id)

    async def _full(self):
        raise QueueFullError("the engine's request queue is full", retry_after_s=2)
        yield


def test_a_refused_prompt_refuses_the_whole_request_at_once(server):
    context = server.context
    object.__setattr__(context, "engine", RefuseThird(context.engine))
    try:
        with StepGate(server.engine) as gate:
            # No engine step runs while the gate is shut: the answer cannot wait for generation.
            body = {"prompt": [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]], "max_tokens": 8, "n": 2,
                    "ignore_eos": True}
            response = post(server, "/v1/completions", body)
            error = error_of(response, 429)
            assert response.headers["retry-after"] == "2" and error["code"] == "queue_full"
            assert gate.steps == 0
    finally:
        object.__setattr__(context, "engine", context.engine.inner)
    assert wait_until(lambda: idle(server), 120)


def test_429_names_no_internals(server):
    context = server.context
    object.__setattr__(context, "engine", FailingClient(server.engine.tokenizer, QueueFullError()))
    try:
        error = error_of(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}), 429)
    finally:
        object.__setattr__(context, "engine", server.client)
    assert "num_queued" not in error["message"] and "Ray" not in error["message"]


# --- 3. request ids ----------------------------------------------------------------------------------
def raw_request(server, request: bytes, timeout_s: float = 120) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_request_ids_are_sanitised_and_agree_with_the_body(server):
    answer = raw_request(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: \xe9\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    for given in ("<b>x y</b>", "a" * 129, ""):
        response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1},
                        headers={"X-Request-Id": given})
        assert response.status_code == 200
        rid = response.headers["x-request-id"]
        assert rid != given and response.json()["id"] == f"cmpl-{rid}"
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1},
                    headers={"X-Request-Id": "trace-1.2:3"})
    assert response.headers["x-request-id"] == "trace-1.2:3" and response.json()["id"] == "cmpl-trace-1.2:3"


def test_the_proxy_middleware_sanitises_before_rays_own():
    from ray.serve._private.http_util import _apply_middlewares

    from services.gateway.proxy import proxy_middlewares

    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"x-request-id"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    proxied = _apply_middlewares(app, proxy_middlewares())
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    for given in (b"\xe9", b"<b>x y</b>", b"ok-1"):
        sent.clear()
        scope = {"type": "http", "method": "GET", "path": "/health", "headers": [(b"x-request-id", given)]}
        asyncio.run(proxied(scope, receive, send))
        echoed = dict(sent[0]["headers"])[b"x-request-id"]
        assert echoed == seen[-1] and (echoed == given) == (given == b"ok-1")
        echoed.decode("utf-8")


# --- 5. slow bodies ----------------------------------------------------------------------------------
def test_a_body_that_stops_arriving_gets_408(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    answer = raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout" in answer


# --- 6. minor ----------------------------------------------------------------------------------------
def test_head_health_and_text_plain(server):
    assert httpx.head(server.url + "/health", timeout=60).status_code == 200
    response = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi"}',
                          headers={"Content-Type": "text/plain", **HTTP_AUTH}, timeout=60)
    error = error_of(response, 415)
    assert "application/json" in error["message"] and error["code"] == "unsupported_media_type"


def test_grpc_undecodable_messages_and_pushback(server):
    garbage = b"\xff\xff\xff\xff"
    client = FailingClient(server.engine.tokenizer, QueueFullError("full"))
    served = Served(client, frozenset({KEY}))
    try:
        for method in ("/grok_serve.v1.Generation/Generate", "/grok_serve.v1.Generation/GenerateStream"):
            call = (served.channel.unary_unary if method.endswith("Generate") else served.channel.unary_stream)(
                method, request_serializer=None, response_deserializer=None)
            for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (AUTH, grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.RpcError) as info:
                    result = call(garbage, metadata=metadata, timeout=60)
                    if hasattr(result, "__next__"):
                        list(result)
                assert info.value.code() == code, info.value.details()
                assert "Error" not in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            served.stub.Generate(pb.GenerateRequest(text="hi"), metadata=AUTH, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (RETRY_PUSHBACK_KEY, "1000") in info.value.trailing_metadata()
        limited = pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(stop=[f"s{i}" for i in range(65)]))
        with pytest.raises(grpc.RpcError) as info:
            served.stub.Generate(limited, metadata=AUTH, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_stop_strings" in info.value.details()
    finally:
        served.close()


def test_the_server_still_serves(server):
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert wait_until(lambda: idle(server), 120)


def test_429_from_serve_names_no_ray_internals():
    from ray.serve.exceptions import BackPressureError

    from services.serve_app import _translate

    translated = _translate(BackPressureError(num_queued_requests=256, max_queued_requests=256, retry_after_s=3))
    assert isinstance(translated, QueueFullError) and translated.retry_after_s == 3
    assert "num_queued" not in str(translated) and "backpressure" not in str(translated).lower()


# --- 4. checkpoints without config.json ---------------------------------------------------------------
_LOAD_UNDER_A_CAP = """
import resource, sys
cap = 3 << 30  # far below Grok-1's weights, far above what loading a small checkpoint takes
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from services.model.checkpoint import load_model
from services.model.release_format import CheckpointError
try:
    load_model(sys.argv[1])
except CheckpointError as exc:
    print("refused:", exc)
    sys.exit(3)
"""


def test_a_checkpoint_without_config_is_refused_before_any_allocation(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from services.model.config import PRESETS
    from tests.release_writer import write_release

    root = write_release(tmp_path / "ckpt", PRESETS["tiny"], with_config=False)
    done = subprocess.run([sys.executable, "-c", _LOAD_UNDER_A_CAP, str(root)], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "config.json" in done.stdout and "embeddings" in done.stdout


def test_grok1_shapes_without_config_give_grok1_with_their_layer_count(tmp_path):
    from services.model.checkpoint import checkpoint_config
    from services.model.config import PRESETS
    from services.model.release_format import param_names
    from services.model.weight_map import release_shape

    grok1 = PRESETS["grok-1"].replace(num_layers=3)
    # Only the header is read: the tensors' bytes need not be there.
    header = {name: {"dtype": "BF16", "shape": list(release_shape(name, grok1)[0]), "data_offsets": [0, 0]}
              for name in param_names(grok1)}
    data = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(data).to_bytes(8, "little") + data)
    assert checkpoint_config(tmp_path, "safetensors") == grok1
    del header["transformer/decoder_layer_0/router/w"]
    data = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(data).to_bytes(8, "little") + data)
    with pytest.raises(ValueError, match="router/w is missing"):
        checkpoint_config(tmp_path, "safetensors")
