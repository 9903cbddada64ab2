"""The `priority` request field end to end: with the engine's one slot taken, a high-priority request
(lower value) is admitted before low-priority ones that arrived earlier. The engine runs only the
steps the test hands out (StepGate), so the order is fixed by construction, not by timing."""
from __future__ import annotations

import concurrent.futures

import pytest

from services.engine.config import EngineConfig
from services.gateway.config import AppConfig
from tests.step_gate import StepGate
from tests.test_gateway_support import LocalServer, assert_rejected, openai_client, wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def served():
    engine = EngineConfig(model="tiny", max_model_len=128, kv_cache_memory_bytes=8 << 20, max_num_seqs=1)
    with LocalServer(AppConfig(engine=engine)) as server, openai_client(server) as client:
        yield server, client.with_options(timeout=300)


def _send(pool, client, prompt, max_tokens, priority=None):
    extra = {"ignore_eos": True}
    if priority is not None:
        extra["priority"] = priority
    return pool.submit(client.completions.create, model="tiny", prompt=prompt, max_tokens=max_tokens,
                       temperature=0, extra_body=extra)


@pytest.mark.parametrize("high", [-10, 0])
def test_high_priority_is_admitted_before_earlier_low_priority(served, high):
    server, client = served
    streams = server.client.engine
    # The pool outlives the gate: leaving it waits for every request, which needs the gate open.
    with concurrent.futures.ThreadPoolExecutor(4) as pool, StepGate(server.engine) as gate:
        # The running request takes the engine's only slot for two steps.
        running = _send(pool, client, "running", 2)
        assert wait_until(lambda: server.engine.num_requests == 1, 60)
        # Queued one at a time, so their arrival order is known.
        waiting = {}
        for queued, (name, priority) in enumerate((("low-1", None), ("low-2", 0), ("high", high)), start=2):
            waiting[name] = _send(pool, client, name, 1, priority)
            assert wait_until(lambda q=queued: streams.num_unfinished == q, 60)
        gate.allow(2)  # the running request's two tokens; the others join the queue meanwhile
        running.result(timeout=120)
        gate.allow(1)  # one admission: the best-ranked waiting request runs and finishes
        first = "high" if high < 0 else "low-1"
        assert waiting[first].result(timeout=120).usage.completion_tokens == 1
        assert [name for name, f in waiting.items() if f.done()] == [first]
    assert all(f.result(timeout=120).usage.completion_tokens == 1 for f in waiting.values())


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, "1", 1.5, True])
def test_bad_priority_is_400_naming_it(served, priority):
    server, _ = served
    assert_rejected(server, "priority", priority)


def test_extreme_priorities_are_served(served):
    _, client = served
    for priority in (2**31 - 1, -(2**31)):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2, extra_body={"priority": priority})
        assert out.usage.completion_tokens >= 1
