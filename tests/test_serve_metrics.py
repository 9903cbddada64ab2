"""Metrics with several replicas under real Ray Serve: every engine replica's series reach `/metrics`
with a `replica` label and add up to the work done, whichever gateway replica answers the scrape."""
from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.config import load_config
from tests.serve_support import served_app
from tests.test_gateway_support import metric, wait_until

pytest.importorskip("ray")

# A hang guard only: on a starved machine Serve alone has taken minutes to come up.
pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

APP = "grok-serve-metrics-test"


@pytest.fixture(scope="module")
def served():
    config = load_config(None, {
        "engine": {"model": "tiny", "kv_cache_memory_bytes": 8 << 20, "max_model_len": 128},
        # One request at a time per engine replica: requests that overlap go to both replicas.
        "engine_deployment": {"num_replicas": 2, "num_cpus": 0.25, "max_ongoing_requests": 1,
                              "max_queued_requests": 64, "health_check_period_s": 1,
                              "graceful_shutdown_timeout_s": 1},
        "gateway_deployment": {"num_replicas": 2, "num_cpus": 0.1, "graceful_shutdown_timeout_s": 1},
    })
    with served_app(config, APP) as url:
        yield url


def labels_of(text: str, name: str, label: str) -> dict[str, float]:
    """label value -> sample value, for the samples called `name`."""
    return {s.labels[label]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_every_engine_replica_is_exported_and_they_add_up(served):
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True, "temperature": 0}

    def send(_):
        response = httpx.post(served + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["completion_tokens"]

    sent = 0

    def both_replicas_worked() -> bool:
        nonlocal sent
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            sent += len(list(pool.map(send, range(4))))
        text = httpx.get(served + "/metrics", timeout=30).text
        per_replica = labels_of(text, "grok_serve:request_success_total", "replica")
        return len(per_replica) == 2 and all(v > 0 for v in per_replica.values())

    assert wait_until(both_replicas_worked, 300, 0)

    def settled() -> bool:
        # The replica the scrape does not reach directly is read from its last publication.
        text = httpx.get(served + "/metrics", timeout=30).text
        return (metric(text, "grok_serve:request_success_total", finished_reason="length") == sent
                and metric(text, "grok_serve:generation_tokens_total") == 8 * sent
                and metric(text, "grok_serve:time_to_first_token_seconds_count") == sent
                and metric(text, "grok_serve:http_requests_total", route="/v1/completions", status="200") == sent)

    assert wait_until(settled, 120, 0.5)
    text = httpx.get(served + "/metrics", timeout=30).text
    assert len(labels_of(text, "grok_serve:generation_tokens_total", "replica")) == 2
    assert len(labels_of(text, "grok_serve:kv_cache_usage_perc", "replica")) == 2
    assert all(age < 60 for age in labels_of(text, "grok_serve:engine_snapshot_age_seconds", "replica").values())
    # Each gateway counts what it answered; together they answered every request.
    gateways = labels_of(text, "grok_serve:request_disconnects_total", "gateway")
    assert len(gateways) == 2, gateways


def test_metrics_answers_quickly_while_the_engines_are_saturated(served):
    # Both replicas hold a request to the end of the context and more wait behind them; the scrape
    # still answers (from the registry) and keeps both replicas.
    body = {"prompt": [5], "ignore_eos": True, "stream": False}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(httpx.post, served + "/v1/completions", json=body, timeout=300) for _ in range(6)]
        text = httpx.get(served + "/metrics", timeout=30).text
        assert len(labels_of(text, "grok_serve:generation_tokens_total", "replica")) == 2
        assert all(f.result().status_code == 200 for f in pending)
