"""The soak (loadtests/soak.py) in short: a minute of its mixed traffic against a server of its own.

No 5xx, every bad request answered with its 4xx, and nothing left in the engine afterwards. The RSS
bound needs a run longer than the warm-up: that is the long soak's job (docs/benchmarks.md)."""
from __future__ import annotations

import pytest

from loadtests.soak import KINDS, soak

pytestmark = pytest.mark.timeout(600)


def test_short_soak():
    report = soak(45, concurrency=4, sample_every_s=10, warmup_s=3600)
    assert report.server_errors == 0, report.requests
    assert report.wrong_status == 0, report.requests
    assert not report.leaked, report.leaked
    assert set(report.requests) == set(KINDS) and sum(sum(c.values()) for c in report.requests.values()) > 0
    assert len(report.rss_mb) >= 2
