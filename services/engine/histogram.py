"""Fixed-bucket histograms: what the engine keeps of its latency and batch-size samples.

Each observation lands in a bucket and is forgotten, so the memory is a few numbers per histogram
however long the engine runs and whether or not anything reads it. The buckets are the exported
ones (services/gateway/metrics.py), so a snapshot renders as Prometheus histograms without loss.
Torch-free: the gateway imports the bucket bounds from here.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
COLLECTIVE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                      10.0)

# Snapshot key -> bucket upper bounds, for every histogram an engine snapshot may carry.
ENGINE_BUCKETS: Mapping[str, tuple[float, ...]] = {
    "ttft": LATENCY_BUCKETS, "itl": ITL_BUCKETS, "e2e": REQUEST_BUCKETS, "queue": REQUEST_BUCKETS,
    "prefill": REQUEST_BUCKETS, "decode": REQUEST_BUCKETS, "tokens_per_step": STEP_TOKEN_BUCKETS,
    "collective_s": COLLECTIVE_BUCKETS,
}


@dataclass
class BucketHistogram:
    """Counts per bucket (`counts[i]`: observations <= bounds[i] and above the bound before; the last
    entry is above every bound), their sum and their number."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"bucket bounds must be strictly increasing, got {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        elif len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.counts)} counts for {len(self.bounds)} bounds")

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (Prometheus' `le`).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_all(self, values: Iterable[float]) -> None:
        for value in values:
            self.observe(value)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it) per bucket, +Inf last: Prometheus' `_bucket`."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out

    def state(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BucketHistogram:
        return cls(tuple(state["bounds"]), [int(n) for n in state["counts"]], float(state["sum"]))
