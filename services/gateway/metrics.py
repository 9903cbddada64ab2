"""Prometheus metrics: vLLM's set under the `grok_serve:` prefix, plus per-expert routing and disconnects.

The engine replica owns the engine's numbers; its client's `metrics_snapshot` (services/engine/api.py)
turns them into plain data (cumulative counters, current gauges, histogram samples drained since the
last call). The gateway asks the engine for a snapshot on each scrape and folds it into its own registry (`GatewayMetrics`, one
`CollectorRegistry` per app, never the process-global one), so a scrape of the HTTP port sees both
the engine and the gateway. Counters are folded as deltas per engine replica, so a restarted replica
(whose counters start again at 0) never makes an exported counter go down.

`METRICS` is the one table of names: docs/metrics.md, alerts and dashboards are checked against
`METRIC_NAMES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "grok_serve:"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without PREFIX; counters without "_total" (prometheus_client appends it)
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()  # besides model_name, which every metric carries
    buckets: tuple[float, ...] = ()

    @property
    def family(self) -> str:
        return PREFIX + self.name

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names a query can use."""
        if self.kind == "counter":
            return (self.family + "_total",)
        if self.kind == "histogram":
            return tuple(self.family + s for s in ("_bucket", "_sum", "_count"))
        return (self.family,)


METRICS: tuple[MetricSpec, ...] = (
    # Scheduler state (engine).
    MetricSpec("num_requests_running", "gauge", "Sequences in the running batch."),
    MetricSpec("num_requests_waiting", "gauge", "Sequences waiting to be scheduled (new or preempted)."),
    MetricSpec("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full)."),
    MetricSpec("num_preemptions", "counter", "Sequences preempted (blocks taken back, recomputed later)."),
    MetricSpec("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    MetricSpec("prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    # Tokens and requests (engine).
    MetricSpec("prompt_tokens", "counter", "Prefill tokens computed (prompt tokens not found in the "
               "prefix cache, plus tokens recomputed after preemption)."),
    MetricSpec("generation_tokens", "counter", "Tokens generated."),
    MetricSpec("request_success", "counter", "Sequences finished, by finish reason (stop, length, abort).",
               ("finished_reason",)),
    MetricSpec("request_aborts", "counter", "Sequences aborted before finishing (client gone, cancelled)."),
    # Latency (engine).
    MetricSpec("time_to_first_token_seconds", "histogram", "From arrival at the engine to the first "
               "generated token.", (), _LATENCY_BUCKETS),
    MetricSpec("inter_token_latency_seconds", "histogram", "Between consecutive generated tokens of a "
               "sequence.", (), _ITL_BUCKETS),
    MetricSpec("e2e_request_latency_seconds", "histogram", "From arrival at the engine to the sequence's "
               "finish.", (), _REQUEST_BUCKETS),
    MetricSpec("request_queue_time_seconds", "histogram", "From arrival at the engine to the first time "
               "it is scheduled.", (), _REQUEST_BUCKETS),
    MetricSpec("request_prefill_time_seconds", "histogram", "From a sequence's first scheduling to its "
               "first generated token (every prefill chunk, and the waits between them).", (), _REQUEST_BUCKETS),
    MetricSpec("request_decode_time_seconds", "histogram", "From a sequence's first generated token to its "
               "finish.", (), _REQUEST_BUCKETS),
    MetricSpec("iteration_tokens_total", "histogram", "Tokens in one engine step (prefill chunks plus "
               "decodes).", (), _STEP_TOKEN_BUCKETS),
    MetricSpec("engine_step_seconds", "counter", "Wall time spent in engine steps."),
    MetricSpec("model_forward_seconds", "counter", "Wall time spent in the model's forward passes."),
    # Mixture of experts (engine).
    MetricSpec("expert_tokens", "counter", "Tokens routed to an expert in a layer (each token goes to "
               "two experts per layer).", ("layer", "expert")),
    MetricSpec("expert_load_imbalance", "gauge", "Per layer: tokens of the busiest expert over the mean "
               "per expert, since start (1 = perfectly balanced).", ("layer",)),
    # Parallel group (engine.parallel_size > 1).
    MetricSpec("collective_seconds", "counter", "Rank 0's wall time inside the model's collectives "
               "(all-reduce, all-gather), waiting for the slowest rank included."),
    MetricSpec("step_broadcast_seconds", "counter", "Rank 0's wall time sending each step's description "
               "to the other ranks."),
    MetricSpec("rank_expert_tokens", "counter", "Routed (token, expert) pairs computed by each rank of the "
               "parallel group (expert e lives on rank e mod N).", ("rank",)),
    # Gateway.
    MetricSpec("http_requests", "counter", "HTTP requests answered, by method, route and status code.",
               ("method", "route", "status")),
    MetricSpec("request_disconnects", "counter", "Requests whose client went away before the answer was "
               "complete (the engine request is aborted)."),
    MetricSpec("engine_scrape_errors", "counter", "Scrapes for which the engine's snapshot could not be "
               "read."),
)

METRIC_NAMES: frozenset[str] = frozenset(s for spec in METRICS for s in spec.series)

# Engine counters in a snapshot -> metric.
_ENGINE_COUNTERS = {
    "preemptions": "num_preemptions", "prefix_cache_queries": "prefix_cache_queries",
    "prefix_cache_hits": "prefix_cache_hits", "prompt_tokens": "prompt_tokens",
    "generation_tokens": "generation_tokens", "aborts": "request_aborts",
    "step_seconds": "engine_step_seconds", "forward_seconds": "model_forward_seconds",
    "collective_seconds": "collective_seconds", "step_broadcast_seconds": "step_broadcast_seconds",
}
_ENGINE_SAMPLES = {
    "ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
    "e2e": "e2e_request_latency_seconds", "queue": "request_queue_time_seconds",
    "prefill": "request_prefill_time_seconds", "decode": "request_decode_time_seconds",
    "tokens_per_step": "iteration_tokens_total",
}


class GatewayMetrics:
    """The app's registry and the gateway's own counters; `fold` adds an engine snapshot."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        for spec in METRICS:
            kwargs: dict[str, Any] = {"registry": self.registry}
            if spec.kind == "histogram":
                kwargs["buckets"] = spec.buckets
            self._metrics[spec.name] = kinds[spec.kind](spec.family, spec.help,
                                                        ("model_name", *spec.labels), **kwargs)
        # Last cumulative value seen per (replica, counter key), to fold deltas.
        self._seen: dict[tuple[str, str], float] = {}

    def _m(self, name: str, **labels: str):
        return self._metrics[name].labels(model_name=self.model_name, **labels)

    def _add(self, replica: str, key: str, value: float, name: str, **labels: str) -> None:
        last = self._seen.get((replica, key), 0)
        # A smaller value than last time: the replica restarted and counts from 0 again.
        delta = value - last if value >= last else value
        self._seen[(replica, key)] = value
        if delta > 0:
            self._m(name, **labels).inc(delta)

    def fold(self, snapshot: dict[str, Any]) -> None:
        replica = str(snapshot.get("replica", ""))
        for key, value in snapshot.get("counters", {}).items():
            if key in _ENGINE_COUNTERS:
                self._add(replica, key, value, _ENGINE_COUNTERS[key])
        for reason, value in snapshot.get("finished", {}).items():
            self._add(replica, f"finished:{reason}", value, "request_success", finished_reason=str(reason))
        for layer, row in enumerate(snapshot.get("expert_tokens", [])):
            for expert, value in enumerate(row):
                self._add(replica, f"expert:{layer}:{expert}", value, "expert_tokens",
                          layer=str(layer), expert=str(expert))
            if row and sum(row) > 0:
                self._m("expert_load_imbalance", layer=str(layer)).set(max(row) * len(row) / sum(row))
        for rank, value in enumerate(snapshot.get("rank_expert_tokens", [])):
            self._add(replica, f"rank:{rank}", value, "rank_expert_tokens", rank=str(rank))
        gauges = snapshot.get("gauges", {})
        self._m("num_requests_running").set(gauges.get("running", 0))
        self._m("num_requests_waiting").set(gauges.get("waiting", 0))
        self._m("kv_cache_usage_perc").set(gauges.get("kv_usage", 0.0))
        for key, values in snapshot.get("samples", {}).items():
            if key in _ENGINE_SAMPLES:
                histogram = self._m(_ENGINE_SAMPLES[key])
                for value in values:
                    histogram.observe(value)

    def http_request(self, method: str, route: str, status: int) -> None:
        self._m("http_requests", method=method, route=route, status=str(status)).inc()

    def disconnect(self) -> None:
        self._m("request_disconnects").inc()

    def scrape_error(self) -> None:
        self._m("engine_scrape_errors").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """Counts every response by method, route template (bounded label set) and status."""

    def __init__(self, app, metrics: GatewayMetrics, routes: frozenset[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 499  # the client went away before any answer (nginx's "client closed request")

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = scope.get("path", "")
            route = path if path in self.routes else "other"
            self.metrics.http_request(scope.get("method", ""), route, status)
