"""Engine statistics stay the same size however many tokens pass with nobody reading them, and keep
exact counts."""
from __future__ import annotations

import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.histogram import ENGINE_BUCKETS, BucketHistogram
from services.engine.sampling_params import SamplingParams
from services.gateway.metrics import GatewayMetrics
from tests.test_gateway_support import metric

pytestmark = pytest.mark.timeout(300)


def stored_numbers(value) -> int:
    """How many numbers an object holds in its lists, dicts and sets, nested ones included."""
    if isinstance(value, dict):
        return sum(1 + stored_numbers(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return sum(1 + stored_numbers(v) for v in value)
    if isinstance(value, BucketHistogram):
        return stored_numbers(value.counts)
    if hasattr(value, "__dict__"):
        return stored_numbers(vars(value))
    return 0


def run(engine: LLMEngine, round_: int, requests: int, tokens: int) -> None:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    for i in range(requests):
        engine.add_request(f"r{round_}-{i}", [3 + i, 4, 5], params)
    while engine.has_unfinished():
        engine.step()


def test_statistics_memory_is_bounded_without_scrapes():
    engine = LLMEngine(EngineConfig(model="tiny", max_model_len=128, kv_cache_memory_bytes=8 << 20))
    stats = engine.stats
    run(engine, 0, 4, 5)
    size = stored_numbers(stats)
    # Twenty times the tokens, nothing reading the statistics in between.
    for round_ in range(1, 6):
        run(engine, round_, 4, 20)
    assert stored_numbers(stats) == size
    assert all(len(h.counts) == len(ENGINE_BUCKETS[key]) + 1 for key, h in stats.histograms.items())

    # And every observation is still counted.
    sequences, generated = 24, 4 * 5 + 20 * 20
    assert stats.generation_tokens == generated
    assert stats.histograms["ttft"].count == sequences
    assert stats.histograms["itl"].count == generated - sequences
    assert stats.histograms["e2e"].count == sequences
    assert stats.histograms["tokens_per_step"].count == stats.steps
    text = _render(engine)
    assert metric(text, "grok_serve:inter_token_latency_seconds_count") == generated - sequences
    assert metric(text, "grok_serve:request_success_total", finished_reason="length") == sequences
    # Reading resets nothing: a second reader sees the same figures.
    assert metric(_render(engine), "grok_serve:time_to_first_token_seconds_count") == sequences


def _render(engine: LLMEngine) -> str:
    metrics = GatewayMetrics("m")
    metrics.fold(engine.metrics_snapshot("r0"))
    return metrics.render().decode()


def test_buckets_follow_prometheus_le():
    h = BucketHistogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(value)
    assert h.cumulative() == [(1.0, 2), (2.0, 4), (float("inf"), 5)]
    assert h.count == 5 and h.sum == 8.0
    assert BucketHistogram.from_state(h.state()) == h
    with pytest.raises(ValueError):
        BucketHistogram((2.0, 1.0))
