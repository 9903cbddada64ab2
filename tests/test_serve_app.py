"""The Ray Serve application end to end: one local Ray, one app for the whole module (127.0.0.1, a free
port), driven with the official openai client and raw HTTP.

Serves the reference tiny checkpoint in float32 when it is present (the golden tests need it), else the
tiny preset. Tests run in file order; the last one kills the engine replica.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from tests.serve_support import served_app
from tests.test_gateway_support import REFERENCE_TINY, metric, reference_tiny_or_skip, wait_until

ray = pytest.importorskip("ray")

from services.gateway.config import load_config
from services.gateway.proxy import HEADER_TIMEOUT_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV
from services.serve_metrics import PublishOptions

# A hang guard only: on a starved machine Serve alone has taken minutes to come up.
pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

APP = "grok-serve"
MAX_ONGOING, MAX_QUEUED = 16, 16


@pytest.fixture(scope="module")
def served():
    model = str(REFERENCE_TINY.resolve()) if (REFERENCE_TINY / "ckpt-0").is_dir() else "tiny"
    config = load_config(None, {
        "served_model_name": "grok-test",
        # Short, so /health reports the engine missing while Serve brings a replacement up.
        "engine_call_timeout_s": 2,
        "engine": {"model": model, "dtype": "float32", "kv_cache_memory_bytes": 32 << 20, "max_num_seqs": 32,
                   "max_model_len": 256},
        "engine_deployment": {"num_cpus": 0.1, "max_ongoing_requests": MAX_ONGOING,
                              "max_queued_requests": MAX_QUEUED, "health_check_period_s": 1,
                              "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 5},
        "gateway_deployment": {"num_cpus": 0.1, "graceful_shutdown_timeout_s": 5},
    })
    # As `grok-serve up` does: Serve's proxy runs the request-id middleware (services/gateway/proxy.py).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    os.environ.setdefault(HEADER_TIMEOUT_ENV, "10")
    with served_app(config, APP) as url:
        yield url


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_request_ids_pass_through_the_proxy_once(served):
    out = httpx.post(served + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                     headers={"X-Request-Id": "trace-7"})
    assert out.headers.get_list("x-request-id") == ["trace-7"] and out.json()["id"] == "cmpl-trace-7"


def test_hostile_request_ids_reach_neither_rays_proxy_nor_the_gateway(served):
    # Ray's proxy answered a non-UTF-8 X-Request-Id with a plain-text 500 and echoed markup unchanged.
    for given in (b"\xe9", b"<b>x y</b>", b"a" * 129):
        out = httpx.post(served + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                         headers=[(b"X-Request-Id", given)])
        assert out.status_code == 200, (given, out.status_code, out.text)
        [echoed] = out.headers.get_list("x-request-id")
        assert re.fullmatch(r"[0-9a-f]{32}", echoed) and out.json()["id"] == f"cmpl-{echoed}"
    assert httpx.get(served + "/health", headers=[(b"X-Request-Id", b"\xe9")]).status_code == 200


def test_headers_that_never_finish_are_cut_by_the_proxy(served):
    from tests.test_header_timeout import read_until_closed

    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert read_until_closed(slow).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert httpx.get(served + "/health").status_code == 200


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_chat_and_completions_through_serve(client):
    chat = client.chat.completions.create(model="grok-test", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    stream = list(client.chat.completions.create(model="grok-test", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens

    extra = {"ignore_eos": True, "return_token_ids": True}
    two = client.completions.create(model="grok-test", prompt="abc", max_tokens=5, n=2, seed=11,
                                    temperature=1.0, logprobs=2, extra_body=extra)
    again = client.completions.create(model="grok-test", prompt="abc", max_tokens=5, n=2, seed=11,
                                      temperature=1.0, logprobs=2, extra_body=extra)
    assert [ids_of(c) for c in two.choices] == [ids_of(c) for c in again.choices]
    assert two.usage.completion_tokens == 10 and len(two.choices[1].logprobs.token_logprobs) == 5
    streamed = list(client.completions.create(model="grok-test", prompt="abc", max_tokens=5, n=2, seed=11,
                                              temperature=1.0, stream=True, extra_body=extra))
    per_choice = {0: [], 1: []}
    for chunk in streamed:
        per_choice[chunk.choices[0].index] += chunk.choices[0].model_extra.get("token_ids") or []
    assert list(per_choice.values()) == [ids_of(c) for c in two.choices]

    base = client.completions.create(model="grok-test", prompt="Hello", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    if len(text) >= 4:
        cut = client.completions.create(model="grok-test", prompt="Hello", max_tokens=16, temperature=0,
                                        stop=[text[2:4]], extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.find(text[2:4])]


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(reference_tiny_or_skip() / "golden_float32.npz"))


def _golden_cases(golden) -> list[tuple[list[int], list[int]]]:
    indices = sorted(int(k.split("_")[1]) for k in golden if k.startswith("prompt_"))
    return [(golden[f"prompt_{j}"].tolist(), golden[f"greedy_{j}"].tolist()) for j in indices]


def _greedy(client, prompt: list[int]) -> list[int]:
    out = client.completions.create(model="grok-test", prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].finish_reason == "length"
    return ids_of(out.choices[0])


def test_golden_greedy_tokens(client, golden):
    for prompt, expected in _golden_cases(golden):
        assert _greedy(client, prompt) == expected


def test_golden_with_16_requests_in_flight(client, golden):
    cases = _golden_cases(golden)
    work = [cases[i % len(cases)] for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda case: _greedy(client, case[0]), work))
    assert results == [expected for _, expected in work]


def test_metrics_after_a_known_workload(served, client):
    # Replicas publish their numbers every period (services/serve_metrics.py), so a scrape may be a
    # period old: "before" is a scrape that two publishes later still shows nothing running and the same
    # count, and "after" one that shows this test's requests.
    period = PublishOptions().period_s

    def settled() -> str | None:
        first = httpx.get(served + "/metrics").text
        time.sleep(2 * period)
        second = httpx.get(served + "/metrics").text
        same = all(metric(first, name) == metric(second, name) for name in (
            "grok_serve:prompt_tokens_total", "grok_serve:generation_tokens_total"))
        return second if same and metric(second, "grok_serve:num_requests_running") == 0 else None

    deadline = time.monotonic() + 300
    while (before := settled()) is None:
        assert time.monotonic() < deadline, "the metrics never settled"
    prompts = [[40, 41, 42], [50, 51, 52, 53]]
    for ids in prompts:
        client.completions.create(model="grok-test", prompt=ids, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = before

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    def published() -> bool:
        nonlocal after
        after = httpx.get(served + "/metrics").text
        return delta("grok_serve:request_success_total", finished_reason="length") >= 2

    assert wait_until(published, 120, 0.5)

    assert delta("grok_serve:request_success_total", finished_reason="length") == 2
    assert delta("grok_serve:prompt_tokens_total") == 7
    assert delta("grok_serve:generation_tokens_total") == 8
    assert delta("grok_serve:time_to_first_token_seconds_count") == 2
    assert delta("grok_serve:inter_token_latency_seconds_count") >= 2 * 2
    assert delta("grok_serve:http_requests_total", route="/v1/completions", status="200") == 2
    # Cumulative since start on both sides: every token the model ran went to 2 experts per layer.
    layers = len({labels for labels in after.splitlines() if labels.startswith("grok_serve:expert_load_imbalance{")})
    assert layers > 0
    assert metric(after, "grok_serve:expert_tokens_total") == 2 * layers * metric(
        after, "grok_serve:iteration_tokens_total_sum")


def test_overload_gets_429_and_accepted_requests_complete(served):
    # Each request runs to the end of the context (253 decode steps), so the accepted ones are still
    # running when the last of the 64 arrives, however fast the engine is.
    body = {"model": "grok-test", "prompt": [7, 8, 9], "max_tokens": 256 - 3, "temperature": 0, "ignore_eos": True}

    def send(_):
        return httpx.post(served + "/v1/completions", json=body, timeout=900)  # queued behind 253-step runs

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(send, range(64)))
    statuses = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code != 429]
    assert rejected and len(accepted) >= MAX_ONGOING, statuses
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
    for r in accepted:
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 256 - 3, r.text[:300]


def test_client_disconnect_frees_blocks(served):
    before = httpx.get(served + "/metrics").text
    # To the end of the context, so it is still decoding when the client leaves.
    body = {"model": "grok-test", "prompt": [7, 8, 9], "max_tokens": 256 - 3, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served + "/v1/completions", json=body, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")

    def settled():
        text = httpx.get(served + "/metrics").text
        return (metric(text, "grok_serve:request_aborts_total") > metric(before, "grok_serve:request_aborts_total")
                and metric(text, "grok_serve:kv_cache_usage_perc") == 0
                and metric(text, "grok_serve:num_requests_running") == 0)

    assert wait_until(settled, 120, 0.5)
    after = httpx.get(served + "/metrics").text
    assert metric(after, "grok_serve:request_disconnects_total") > metric(before, "grok_serve:request_disconnects_total")


def test_killing_the_engine_replica_is_survived(served, client):
    events = []
    streaming = threading.Event()

    def stream():
        body = {"model": "grok-test", "prompt": [7], "max_tokens": 256 - 1, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    streaming.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(300)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "GrokEngine" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    killed = time.monotonic()
    seen = []

    def health_fails():
        response = httpx.get(served + "/health", timeout=30)
        seen.append((round(time.monotonic() - killed, 2), response.status_code))
        return response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"

    assert wait_until(health_fails, 300, 0.2), seen
    assert wait_until(lambda: httpx.get(served + "/health", timeout=30).status_code == 200, 600, 1.0), \
        "Serve did not restore the engine replica in time"
    out = client.completions.create(model="grok-test", prompt="back", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3
    reader.join(timeout=300)
    # The stream cut by the kill ends cleanly: an in-band error, then [DONE].
    assert events[-1] == "[DONE]"
    errors = [e for e in events if e.startswith('{"error"')]
    assert all('"engine_unavailable"' in e for e in errors), errors
