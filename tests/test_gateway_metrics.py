"""Metrics: the name table, folding engine snapshots, and /metrics after a known workload."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from services.gateway.metrics import METRIC_NAMES, METRICS, PREFIX, GatewayMetrics
from tests.test_gateway_support import LocalServer, metric, tiny_config

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def test_every_metric_is_documented_and_prefixed():
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"`(grok_serve:[a-z0-9_:]+)`", text))
    for spec in METRICS:
        assert spec.family.startswith(PREFIX)
        assert set(spec.series) <= METRIC_NAMES
        assert documented & {spec.family, *spec.series}, f"{spec.family} is not in docs/metrics.md"
    # And the docs name nothing that does not exist.
    assert documented <= METRIC_NAMES | {spec.family for spec in METRICS}, documented - METRIC_NAMES


def _snapshot(replica: str, prompt: int, finished: int, experts: list[list[int]], **samples) -> dict:
    return {"replica": replica, "counters": {"prompt_tokens": prompt}, "finished": {"stop": finished},
            "gauges": {"running": 1, "waiting": 2, "kv_usage": 0.25}, "expert_tokens": experts,
            "samples": samples}


def test_fold_keeps_one_series_per_replica():
    m = GatewayMetrics("m")
    m.fold(_snapshot("a", 10, 2, [[3, 1]], ttft=[0.1, 0.2]))
    m.fold(_snapshot("a", 15, 3, [[5, 3]], ttft=[0.3]))  # cumulative values replace, raw samples add up
    m.fold(_snapshot("b", 4, 1, [[1, 1]]))
    text = m.render().decode()
    assert metric(text, "grok_serve:prompt_tokens_total", replica="a") == 15
    assert metric(text, "grok_serve:prompt_tokens_total") == 19
    assert metric(text, "grok_serve:request_success_total", finished_reason="stop") == 4
    assert metric(text, "grok_serve:expert_tokens_total", layer="0", expert="0") == 6
    assert metric(text, "grok_serve:time_to_first_token_seconds_count", replica="a") == 3
    assert metric(text, "grok_serve:time_to_first_token_seconds_bucket", replica="a", le="0.5") == 3
    assert metric(text, "grok_serve:num_requests_waiting", replica="b") == 2
    assert metric(text, "grok_serve:expert_load_imbalance", replica="a", layer="0") == 1.25
    assert metric(text, "grok_serve:expert_load_imbalance", replica="b", layer="0") == 1.0
    m.fold(_snapshot("b", 2, 1, [[1, 1]]))  # b restarted: its counter resets, which Prometheus handles
    assert metric(m.render().decode(), "grok_serve:prompt_tokens_total", replica="b") == 2


def test_a_collection_replaces_replicas_and_keeps_other_gateways():
    m = GatewayMetrics("m", gateway="g1")
    m.http_request("GET", "/v1/models", 200)
    other = {"gateway": "g2", "counters": {"http": [["GET", "/v1/models", "200", 5]], "disconnects": 1,
                                            "scrape_errors": 0}}
    mine_as_published = {"gateway": "g1", "counters": {"http": [["GET", "/v1/models", "200", 99]]}}
    a, b = _snapshot("a", 10, 2, [[3, 1]]), _snapshot("b", 4, 1, [[1, 1]])
    m.fold({"engines": [{**a, "age_s": 1.0}, {**b, "age_s": 2.0}], "gateways": [other, mine_as_published]})
    text = m.render().decode()
    assert metric(text, "grok_serve:prompt_tokens_total") == 14
    assert metric(text, "grok_serve:http_requests_total", gateway="g1") == 1  # its own, live
    assert metric(text, "grok_serve:http_requests_total", gateway="g2") == 5
    assert metric(text, "grok_serve:request_disconnects_total") == 1
    assert metric(text, "grok_serve:engine_snapshot_age_seconds", replica="b") >= 2.0
    assert metric(text, "grok_serve:engine_scrape_errors_total") == 0
    # Replica a is gone (replaced), b's numbers are stale: a scrape error, b still exported.
    m.fold({"engines": [{**b, "age_s": 600.0}], "gateways": [other]})
    text = m.render().decode()
    assert metric(text, "grok_serve:prompt_tokens_total", replica="a") == 0
    assert metric(text, "grok_serve:prompt_tokens_total", replica="b") == 4
    assert metric(text, "grok_serve:engine_scrape_errors_total", gateway="g1") == 1


def test_gauges_an_engine_does_not_report_are_left_out():
    # vLLM's client reports running sequences only: waiting and KV usage must not read as 0.
    m = GatewayMetrics("m")
    m.fold({"replica": "v", "counters": {"prompt_tokens": 3}, "gauges": {"running": 1},
            "samples": {"ttft": [0.1], "itl": [], "e2e": []}})
    text = m.render().decode()
    assert "grok_serve:num_requests_running{" in text
    assert "grok_serve:num_requests_waiting{" not in text and "grok_serve:kv_cache_usage_perc{" not in text


def test_registries_are_per_app():
    a, b = GatewayMetrics("a"), GatewayMetrics("b")
    a.disconnect()
    assert metric(b.render().decode(), "grok_serve:request_disconnects_total") == 0


@pytest.fixture(scope="module")
def server():
    with LocalServer(tiny_config()) as s:
        yield s


def test_metrics_after_a_known_workload(server):
    # Distinct prompts shorter than a block: no prefix-cache hits, so every prompt token is computed.
    prompts = [[10, 11, 12], [20, 21, 22, 23, 24], [30, 31]]
    ns = [1, 2, 1]
    for ids, n in zip(prompts, ns):
        out = httpx.post(server.url + "/v1/completions", json={
            "prompt": ids, "max_tokens": 5, "n": n, "seed": 1, "ignore_eos": True})
        assert out.status_code == 200
    bad = httpx.post(server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 0})
    assert bad.status_code == 400
    text = httpx.get(server.url + "/metrics").text

    sequences = sum(ns)
    prompt_tokens = sum(len(ids) * n for ids, n in zip(prompts, ns))  # each sequence prefills its prompt
    generated = 5 * sequences
    assert metric(text, "grok_serve:request_success_total", finished_reason="length") == sequences
    assert metric(text, "grok_serve:request_success_total", finished_reason="stop") == 0
    assert metric(text, "grok_serve:prompt_tokens_total") == prompt_tokens
    assert metric(text, "grok_serve:generation_tokens_total") == generated
    # The model ran every prompt token and every generated token but the last of each sequence; each
    # of those went to two experts in every layer.
    forward_tokens = prompt_tokens + generated - sequences
    assert metric(text, "grok_serve:iteration_tokens_total_sum") == forward_tokens
    layers = server.context.model.num_layers
    assert metric(text, "grok_serve:expert_tokens_total") == 2 * layers * forward_tokens
    for layer in range(layers):
        per_layer = metric(text, "grok_serve:expert_tokens_total", layer=str(layer))
        assert per_layer == 2 * forward_tokens
        assert metric(text, "grok_serve:expert_load_imbalance", layer=str(layer)) >= 1.0
    assert metric(text, "grok_serve:time_to_first_token_seconds_count") == sequences
    # One interval per generated token after the first.
    assert metric(text, "grok_serve:inter_token_latency_seconds_count") == generated - sequences
    assert metric(text, "grok_serve:e2e_request_latency_seconds_count") == sequences
    assert metric(text, "grok_serve:request_queue_time_seconds_count") == sequences
    assert metric(text, "grok_serve:request_prefill_time_seconds_count") == sequences
    assert metric(text, "grok_serve:request_decode_time_seconds_count") == sequences
    # Prefill + decode of a sequence never exceed its end-to-end time (queueing comes on top).
    assert (metric(text, "grok_serve:request_prefill_time_seconds_sum")
            + metric(text, "grok_serve:request_decode_time_seconds_sum")
            <= metric(text, "grok_serve:e2e_request_latency_seconds_sum") + 1e-9)
    assert metric(text, "grok_serve:time_to_first_token_seconds_sum") > 0
    assert metric(text, "grok_serve:kv_cache_usage_perc") == 0
    assert metric(text, "grok_serve:num_requests_running") == 0
    assert metric(text, "grok_serve:http_requests_total", route="/v1/completions", status="200") == 3
    assert metric(text, "grok_serve:http_requests_total", route="/v1/completions", status="400") == 1
    # Samples are handed out once: a second scrape adds nothing.
    again = httpx.get(server.url + "/metrics").text
    assert metric(again, "grok_serve:time_to_first_token_seconds_count") == sequences
    assert metric(again, "grok_serve:http_requests_total", route="/metrics", status="200") == 1
