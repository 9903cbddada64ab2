"""What the server itself measured during a load-test run: its Prometheus counters scraped before and
after, turned into per-step and per-token figures that split the client's inter-token latency.

    client ITL  =  engine ITL (step to step, seen by the engine)  +  the path from engine to client socket
    engine ITL  =  step time  +  time between steps (loop overhead, waiting for the GIL or a core)
    step time   =  model forward  +  scheduler, sampler, output processing

Both servers export vLLM's histogram names under their own prefix (`grok_serve:`, `vllm:`); the step and
forward counters exist only in ours, so the peer's rows leave them empty.
"""
from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("grok_serve:", "vllm:")
# Cumulative sample names (prefix stripped) that the split needs.
SAMPLES = ("iteration_tokens_total_count", "iteration_tokens_total_sum", "engine_step_seconds_total",
           "model_forward_seconds_total", "inter_token_latency_seconds_count",
           "inter_token_latency_seconds_sum", "time_to_first_token_seconds_count",
           "time_to_first_token_seconds_sum", "generation_tokens_total")


def scrape(url: str, api_key: str = "", timeout_s: float = 30) -> dict[str, float]:
    """The server's cumulative samples of interest, summed over labels; {} when it has no /metrics."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url + "/metrics", headers=headers, timeout=timeout_s)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            for prefix in PREFIXES:
                if sample.name.startswith(prefix) and sample.name[len(prefix):] in SAMPLES:
                    name = sample.name[len(prefix):]
                    values[name] = values.get(name, 0.0) + sample.value
    return values


def split(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    """Per-step and per-token figures over the run (None where the server does not export the input)."""
    def delta(name: str) -> float | None:
        if name not in after:
            return None
        return after[name] - before.get(name, 0.0)

    def ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
        return None if num is None or not den else num / den * scale

    steps = delta("iteration_tokens_total_count")
    step_s = delta("engine_step_seconds_total")
    return {
        "steps": steps,
        "tokens_per_step": ratio(delta("iteration_tokens_total_sum"), steps),
        "step_ms": ratio(step_s, steps, 1000),
        "forward_ms": ratio(delta("model_forward_seconds_total"), steps, 1000),
        "engine_itl_ms": ratio(delta("inter_token_latency_seconds_sum"),
                               delta("inter_token_latency_seconds_count"), 1000),
        "engine_ttft_ms": ratio(delta("time_to_first_token_seconds_sum"),
                                delta("time_to_first_token_seconds_count"), 1000),
        # Fraction of the run the engine spent inside steps: near 1 means the engine is the bottleneck.
        "engine_busy": ratio(step_s, wall_s),
    }
