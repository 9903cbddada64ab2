"""Prometheus metrics: vLLM's set under the `grok_serve:` prefix, plus per-expert routing and disconnects.

Every engine replica's numbers are exported as its own series, labelled `replica`; the gateway's own
counters are labelled `gateway` (its replica). A scrape reaches one gateway replica, and that one
answers for all of them:

- An engine replica keeps its numbers cumulative (`ReplicaSeries`: counters, gauges, fixed-bucket
  histograms; services/engine/histogram.py), so reading them twice, or from two gateways, gives the
  same figures, and a replaced replica is a new series whose counters start at 0 (Prometheus' `rate`
  takes a counter reset in its stride).
- Under Ray Serve, each engine and gateway replica publishes its numbers every few seconds to a small
  registry actor (services/serve_metrics.py), and `/metrics` renders the registry's collection: a
  handle call reaches one replica, the registry holds them all. The age of each engine replica's
  numbers is exported (`engine_snapshot_age_seconds`); stale or unreadable ones count as
  `engine_scrape_errors`.
- An engine in this process (`LocalEngineClient`, tests) hands its snapshot straight to `fold`.

A snapshot (services/engine/api.py, `EngineClient.metrics_snapshot`) carries histograms either as
cumulative bucket states (`{"bounds", "counts", "sum"}`) or as raw observations made since the last
snapshot (lists, from an engine that keeps them until read); a `ReplicaSeries` turns both into
cumulative states. Gauges an engine does not report (vLLM's waiting queue and KV cache) are left out
rather than exported as 0.

`METRICS` is the one table of names: docs/metrics.md, alerts and dashboards are checked against
`METRIC_NAMES`.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from services.engine.histogram import (
    ENGINE_BUCKETS,
    ITL_BUCKETS,
    LATENCY_BUCKETS,
    REQUEST_BUCKETS,
    STEP_TOKEN_BUCKETS,
    BucketHistogram,
)

PREFIX = "grok_serve:"
# The label that tells engine replicas apart, and the one that tells gateway replicas apart.
ENGINE_LABEL, GATEWAY_LABEL = "replica", "gateway"
# An engine replica whose numbers are older than this is counted as a scrape error (its figures are
# still exported, with their age).
STALE_AFTER_S = 15.0


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without PREFIX; counters without "_total" (the exposition appends it)
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()  # besides model_name and the source's label, which every metric carries
    buckets: tuple[float, ...] = ()
    source: str = "engine"  # "engine": one series per engine replica; "gateway": per gateway replica

    def __post_init__(self) -> None:
        if self.kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if self.source not in ("engine", "gateway"):
            raise ValueError(f"{self.name}: unknown source {self.source!r}")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"{self.name}: histograms, and only they, have buckets")

    @property
    def family(self) -> str:
        return PREFIX + self.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return ("model_name", ENGINE_LABEL if self.source == "engine" else GATEWAY_LABEL, *self.labels)

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
               "generated token.", (), LATENCY_BUCKETS),
    MetricSpec("inter_token_latency_seconds", "histogram", "Between consecutive generated tokens of a "
               "sequence.", (), ITL_BUCKETS),
    MetricSpec("e2e_request_latency_seconds", "histogram", "From arrival at the engine to the sequence's "
               "finish.", (), REQUEST_BUCKETS),
    MetricSpec("request_queue_time_seconds", "histogram", "From arrival at the engine to the first time "
               "it is scheduled.", (), REQUEST_BUCKETS),
    MetricSpec("request_prefill_time_seconds", "histogram", "From a sequence's first scheduling to its "
               "first generated token (every prefill chunk, and the waits between them).", (), REQUEST_BUCKETS),
    MetricSpec("request_decode_time_seconds", "histogram", "From a sequence's first generated token to its "
               "finish.", (), REQUEST_BUCKETS),
    MetricSpec("iteration_tokens_total", "histogram", "Tokens in one engine step (prefill chunks plus "
               "decodes).", (), STEP_TOKEN_BUCKETS),
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
    # Freshness (engine, as the answering gateway sees it).
    MetricSpec("engine_snapshot_age_seconds", "gauge", "Age of the engine replica's numbers in this "
               "scrape (they are published every few seconds; large when the replica stopped publishing)."),
    # Gateway.
    MetricSpec("http_requests", "counter", "HTTP requests answered, by method, route and status code.",
               ("method", "route", "status"), source="gateway"),
    MetricSpec("request_disconnects", "counter", "Requests whose client went away before the answer was "
               "complete (the engine request is aborted).", source="gateway"),
    MetricSpec("engine_scrape_errors", "counter", "Scrapes answered without current numbers from every "
               "engine replica (none could be read in time, or one's are stale).", source="gateway"),
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
_ENGINE_GAUGES = {"running": "num_requests_running", "waiting": "num_requests_waiting",
                  "kv_usage": "kv_cache_usage_perc"}
_ENGINE_HISTOGRAMS = {
    "ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
    "e2e": "e2e_request_latency_seconds", "queue": "request_queue_time_seconds",
    "prefill": "request_prefill_time_seconds", "decode": "request_decode_time_seconds",
    "tokens_per_step": "iteration_tokens_total",
}


@dataclass
class ReplicaSeries:
    """One engine replica's numbers, cumulative since it started."""

    replica: str
    counters: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    expert_tokens: list[list[int]] = field(default_factory=list)
    rank_expert_tokens: list[int] = field(default_factory=list)
    histograms: dict[str, BucketHistogram] = field(default_factory=dict)

    def fold(self, snapshot: Mapping[str, Any]) -> None:
        """Take a newer snapshot of this replica: cumulative values replace, raw samples add up."""
        self.counters.update(snapshot.get("counters", {}))
        self.finished.update(snapshot.get("finished", {}))
        # Whatever the engine reports now; a gauge it never reports stays out of the export.
        self.gauges = dict(snapshot.get("gauges", {}))
        if "expert_tokens" in snapshot:
            self.expert_tokens = [list(row) for row in snapshot["expert_tokens"]]
        if "rank_expert_tokens" in snapshot:
            self.rank_expert_tokens = list(snapshot["rank_expert_tokens"])
        for section in ("samples", "histograms"):
            for key, value in snapshot.get(section, {}).items():
                if isinstance(value, Mapping):
                    self.histograms[key] = BucketHistogram.from_state(value)
                elif key in ENGINE_BUCKETS:
                    self.histograms.setdefault(key, BucketHistogram(ENGINE_BUCKETS[key])).observe_all(value)

    def to_snapshot(self) -> dict[str, Any]:
        """The cumulative form, which any number of readers may fold (the registry's entries)."""
        return {"replica": self.replica, "counters": dict(self.counters), "finished": dict(self.finished),
                "gauges": dict(self.gauges), "expert_tokens": [list(r) for r in self.expert_tokens],
                "rank_expert_tokens": list(self.rank_expert_tokens),
                "histograms": {key: h.state() for key, h in self.histograms.items()}}


@dataclass
class GatewayCounters:
    """One gateway replica's own counters."""

    http: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (method, route, status)
    disconnects: float = 0
    scrape_errors: float = 0

    def state(self) -> dict[str, Any]:
        return {"http": [[*key, n] for key, n in self.http.items()], "disconnects": self.disconnects,
                "scrape_errors": self.scrape_errors}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> GatewayCounters:
        return cls({(m, r, s): n for m, r, s, n in state.get("http", [])}, state.get("disconnects", 0),
                   state.get("scrape_errors", 0))


class GatewayMetrics:
    """The app's registry (one `CollectorRegistry` per app, never the process-global one): this gateway's
    counters, other gateways' as last published, and every engine replica's series (`fold`)."""

    def __init__(self, model_name: str, gateway: str = "local"):
        self.model_name = model_name
        self.gateway = gateway
        self.own = GatewayCounters()
        self._peers: dict[str, GatewayCounters] = {}
        # replica -> (its series, monotonic time its numbers were current)
        self._engines: dict[str, tuple[ReplicaSeries, float]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def fold(self, snapshot: Mapping[str, Any]) -> None:
        """An engine replica's snapshot, or a collection of every replica's (`{"engines": [snapshot with
        "age_s", ...], "gateways": [{"gateway", "counters"}, ...]}`), which replaces what was known."""
        now = time.monotonic()
        if "engines" not in snapshot:
            replica = str(snapshot.get("replica", ""))
            series = self._engines.get(replica, (ReplicaSeries(replica), now))[0]
            series.fold(snapshot)
            self._engines[replica] = (series, now)
            return
        engines = {}
        for entry in snapshot["engines"]:
            series = ReplicaSeries(str(entry.get("replica", "")))
            series.fold(entry)
            engines[series.replica] = (series, now - float(entry.get("age_s", 0.0)))
        self._engines = engines
        self._peers = {str(g["gateway"]): GatewayCounters.from_state(g.get("counters", {}))
                       for g in snapshot.get("gateways", []) if str(g.get("gateway")) != self.gateway}
        if not engines or any(now - at > STALE_AFTER_S for _, at in engines.values()):
            self.scrape_error()

    def http_request(self, method: str, route: str, status: int) -> None:
        key = (method, route, str(status))
        self.own.http[key] = self.own.http.get(key, 0) + 1

    def disconnect(self) -> None:
        self.own.disconnects += 1

    def scrape_error(self) -> None:
        self.own.scrape_errors += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- exposition ------------------------------------------------------------------------------
    def families(self) -> Iterator[Metric]:
        now = time.monotonic()
        families = {spec.name: _family(spec) for spec in METRICS}

        def add(name: str, source: str, value: float, *labels: str) -> None:
            families[name].add_metric([self.model_name, source, *labels], value)

        for replica, (s, at) in sorted(self._engines.items()):
            add("engine_snapshot_age_seconds", replica, max(0.0, now - at))
            for key, value in s.counters.items():
                if key in _ENGINE_COUNTERS:
                    add(_ENGINE_COUNTERS[key], replica, value)
            for reason, value in s.finished.items():
                add("request_success", replica, value, str(reason))
            for key, value in s.gauges.items():
                if key in _ENGINE_GAUGES:
                    add(_ENGINE_GAUGES[key], replica, value)
            for layer, row in enumerate(s.expert_tokens):
                for expert, value in enumerate(row):
                    add("expert_tokens", replica, value, str(layer), str(expert))
                if row and sum(row) > 0:
                    add("expert_load_imbalance", replica, max(row) * len(row) / sum(row), str(layer))
            for rank, value in enumerate(s.rank_expert_tokens):
                add("rank_expert_tokens", replica, value, str(rank))
            for key, name in _ENGINE_HISTOGRAMS.items():
                h = s.histograms.get(key)
                if h is not None:
                    buckets = [(floatToGoString(b), n) for b, n in h.cumulative()]
                    families[name].add_metric([self.model_name, replica], buckets, h.sum)
        for gateway, counters in sorted({**self._peers, self.gateway: self.own}.items()):
            for (method, route, status), n in sorted(counters.http.items()):
                add("http_requests", gateway, n, method, route, status)
            add("request_disconnects", gateway, counters.disconnects)
            add("engine_scrape_errors", gateway, counters.scrape_errors)
        yield from families.values()


def _family(spec: MetricSpec) -> Metric:
    kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
    return kind[spec.kind](spec.family, spec.help, labels=spec.label_names)


class _Collector:
    def __init__(self, metrics: GatewayMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()


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
