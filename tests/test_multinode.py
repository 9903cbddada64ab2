"""grok-serve on a Ray cluster of three real nodes (raylets with their own resources and object stores, on
127.0.0.1): replicas spread over nodes, a zero-downtime config update, a node lost under traffic, a
parallel group spanning two nodes, autoscaling under a locust load.

One cluster for the whole module (each start costs seconds); the tests run in file order and each
leaves the cluster as the next expects: three nodes, the previous application deleted. Every node has
one logical CPU: engine replicas take 0.3, the gateway 0.1, so placement, not CPU counts, decides
where the replicas go. Requests that must still be running at some point are long by construction
(to the end of the context); conditions are awaited with generous deadlines, never timed.
"""
from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time
from typing import ClassVar

import httpx
import numpy as np
import psutil
import pytest

from loadtests import run as lt
from services.gateway.config import AppConfig, load_config
from tests.serve_support import actor_nodes, local_cluster, replica_nodes
from tests.test_gateway_support import reference_tiny_or_skip, wait_until
from tests.test_serve_metrics import labels_of

ray = pytest.importorskip("ray")
from ray import serve

# The hang guard is an hour: squeezed onto one shared core, a config rollout that waits for streams to
# drain took longer than 15 minutes (three raylets and every replica process share that core).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

APP = "grok-multinode"
CONTEXT = 2048  # the tiny preset's context: a stream to its end is thousands of decode steps
NUM_SEQS, NEW_NUM_SEQS = 3, 2
STREAMS = 2 * NUM_SEQS  # enough for both replicas' batches
# Room beyond the streams: a replica at max_ongoing_requests queues /metrics' snapshot call too.
MAX_ONGOING = STREAMS + 2


def engine_config(**overrides) -> AppConfig:
    base = {
        "served_model_name": "grok-test",
        "engine_call_timeout_s": 5,
        "engine": {"model": "tiny", "kv_cache_memory_bytes": 16 << 20, "max_num_seqs": NUM_SEQS,
                   "max_model_len": CONTEXT},
        "engine_deployment": {"num_replicas": 2, "max_replicas_per_node": 1, "num_cpus": 0.3,
                              "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": 64,
                              "health_check_period_s": 1, "health_check_timeout_s": 30,
                              # Long: a stopping replica waits for its streams, however slow they are
                              # (squeezed onto one shared core, a stream to the end of the context
                              # outlasted 600 s and was cut when its gateway replica was stopped).
                              "graceful_shutdown_timeout_s": 3000},
        "gateway_deployment": {"num_cpus": 0.1, "graceful_shutdown_timeout_s": 3000},
    }
    return load_config(None, _merged(base, overrides))


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


GATEWAY_RESOURCE = "grok_gateway"  # the chart's pin of gateway replicas to gateway pods, here the head


def deploy(config: AppConfig, name: str = APP) -> None:
    """The application as build_application makes it, the gateway pinned to the head as the chart pins
    it to gateway pods: a lost GPU node takes engine replicas only."""
    from services.serve_app import EngineDeployment, GatewayDeployment, engine_options, gateway_options

    engine = EngineDeployment.options(**engine_options(config)).bind(config)
    options = gateway_options(config)
    options["ray_actor_options"] = {**options["ray_actor_options"], "resources": {GATEWAY_RESOURCE: 1}}
    serve.run(GatewayDeployment.options(**options).bind(engine, config), name=name, route_prefix="/")


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=3, head_resources={GATEWAY_RESOURCE: 1000}) as c:
        yield c


def live_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def head_node(cluster) -> str:
    return cluster.cluster.head_node.node_id


def short(url: str, tokens: int = 4) -> httpx.Response:
    body = {"model": "grok-test", "prompt": [5, 6, 7], "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def served_by_each(url: str, replicas: set[str]) -> bool:
    """Sends overlapping requests until every one of `replicas` has answered some (its own series)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for response in pool.map(lambda _: short(url), range(4)):
            assert response.status_code == 200, response.text
    text = httpx.get(url + "/metrics", timeout=60).text
    done = labels_of(text, "grok_serve:request_success_total", "replica")
    return all(done.get(r, 0) > 0 for r in replicas)


class Stream:
    """One streamed completion to the end of the context, read on its own thread: what it received, how
    it ended and when."""

    def __init__(self, url: str, prompt: list[int], context: int = CONTEXT):
        self.events: list[str] = []
        self.status: int | None = None
        self.error: str | None = None  # a transport failure (none expected: errors come in-band)
        self.ended_at: float | None = None
        self.started = threading.Event()
        self._closing = threading.Event()
        body = {"model": "grok-test", "prompt": prompt, "max_tokens": context - len(prompt), "ignore_eos": True,
                "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
        self.expected_tokens = body["max_tokens"]
        self._thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if self._closing.is_set():
                        break  # the client goes away: the gateway aborts the request
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except Exception as exc:  # noqa: BLE001 - recorded; the test asserts there is none
            self.error = repr(exc)
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def close(self) -> None:
        self._closing.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def errors(self) -> list[dict]:
        return [json.loads(e)["error"] for e in self.events if e.startswith('{"error"')]

    @property
    def tokens(self) -> int | None:
        usage = [json.loads(e).get("usage") for e in self.events if e.startswith('{"id"')]
        return next((u["completion_tokens"] for u in reversed(usage) if u), None)

    @property
    def finish_reason(self) -> str | None:
        chunks = [json.loads(e) for e in self.events if e.startswith('{"id"')]
        reasons = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
        return next((r for r in reversed(reasons) if r), None)

    @property
    def completed(self) -> bool:
        return (self.status == 200 and self.error is None and not self.errors and self.events[-1:] == ["[DONE]"]
                and self.finish_reason == "length" and self.tokens == self.expected_tokens)


class Trickle:
    """Short requests one after another until stopped: what a client sending new requests sees."""

    live: ClassVar[list[Trickle]] = []  # stopped after each test whatever its outcome (fixture stop_trickles)

    def __init__(self, url: str):
        self.results: list[tuple[float, int, str]] = []  # (monotonic time sent, status, error code)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        Trickle.live.append(self)
        self._thread.start()

    def _run(self, url: str) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                response = short(url)
                code = "" if response.status_code == 200 else response.json()["error"].get("code", "")
                self.results.append((sent, response.status_code, code))
            except httpx.HTTPError as exc:
                self.results.append((sent, 0, repr(exc)))
                # A refused connection returns at once: without a pause this loop would take a core
                # from everything else on the machine.
                self._stop.wait(0.5)

    def stop(self) -> list[tuple[float, int, str]]:
        self._stop.set()
        self._thread.join(600)
        if self in Trickle.live:
            Trickle.live.remove(self)
        return self.results


@pytest.fixture(autouse=True)
def stop_trickles():
    """A test that fails before stopping its Trickle must not leave it sending into the next tests."""
    yield
    for trickle in list(Trickle.live):
        trickle.stop()


# --- replicas across nodes ---------------------------------------------------------------------------
def test_replicas_land_on_different_nodes_and_both_serve(cluster):
    deploy(engine_config())
    nodes = replica_nodes(APP)
    assert len(nodes) == 2 and len(set(nodes.values())) == 2, nodes
    assert set(nodes.values()) <= live_nodes()
    assert wait_until(lambda: served_by_each(cluster.url, set(nodes)), 300, 0)


def per_replica(url: str, name: str) -> dict[str, float]:
    return labels_of(httpx.get(url + "/metrics", timeout=60).text, name, "replica")


def streams_on_both(url: str, wait: bool = True) -> list[Stream]:
    """STREAMS streams at once (Serve balances them over the replicas), each to the end of the context;
    all under way when `wait` (only those the engines admit at once can be)."""
    streams = [Stream(url, [5 + i, 6, 7]) for i in range(STREAMS)]
    if wait:
        assert all(s.started.wait(600) for s in streams)
    return streams


def closed(streams: list[Stream]) -> None:
    for s in streams:
        s.close()
    assert all(s.join(600) for s in streams)


# --- zero-downtime config update ---------------------------------------------------------------------
def test_config_update_under_streams_loses_no_request(cluster):
    before = set(replica_nodes(APP))
    streams = streams_on_both(cluster.url)
    trickle = Trickle(cluster.url)
    # Every replica of both deployments is replaced (their arguments changed); serve.run returns once
    # the new version serves, while the old replicas still drain their streams.
    deploy(engine_config(engine={"max_num_seqs": NEW_NUM_SEQS}, engine_deployment={"max_surge_percent": 50}))
    for s in streams:
        assert s.join(1800), "a stream on a replacing replica never ended"
    results = trickle.stop()
    for s in streams:
        assert s.completed, (s.status, s.error, s.errors, s.finish_reason, s.tokens)
    assert results and all(status == 200 for _, status, _ in results), results
    assert wait_until(lambda: not set(replica_nodes(APP)) & before, 300, 1.0), "old replicas did not stop"
    # In effect: however Serve splits the streams, no replica runs more than the new max_num_seqs at
    # once, and those beyond wait in the schedulers (under the old value fewer or none would wait).
    after = set(replica_nodes(APP))
    streams = streams_on_both(cluster.url, wait=False)
    try:
        def capped() -> bool:
            running = per_replica(cluster.url, "grok_serve:num_requests_running")
            waiting = per_replica(cluster.url, "grok_serve:num_requests_waiting")
            return (set(running) >= after and all(running[r] <= NEW_NUM_SEQS for r in after)
                    and sum(running[r] + waiting[r] for r in after) == STREAMS
                    and sum(waiting[r] for r in after) >= STREAMS - len(after) * NEW_NUM_SEQS)

        assert wait_until(capped, 300, 0.5), (per_replica(cluster.url, "grok_serve:num_requests_running"),
                                               per_replica(cluster.url, "grok_serve:num_requests_waiting"))
    finally:
        closed(streams)


# --- a node lost -------------------------------------------------------------------------------------
def test_node_lost_under_traffic(cluster):
    nodes = replica_nodes(APP)
    assert len(set(nodes.values())) == 2, nodes
    head = head_node(cluster)
    victim_replica, victim_node = next((r, n) for r, n in nodes.items() if n != head)
    survivor = next(r for r in nodes if r != victim_replica)
    victim = next(w for w in cluster.workers if w.node_id == victim_node)
    streams = streams_on_both(cluster.url)
    trickle = Trickle(cluster.url)
    lost = time.monotonic()
    cluster.cluster.remove_node(victim, allow_graceful=False)  # its raylet and workers killed: a crash

    for s in streams:
        assert s.join(1200), "a stream hung after its node was lost"
    cut = [s for s in streams if not s.completed]
    # The streams on the lost replica end with an in-band error naming the engine (then [DONE]); those
    # on the surviving one run to their end untouched.
    assert 1 <= len(cut) < len(streams), [(s.status, s.errors, s.finish_reason) for s in streams]
    for s in cut:
        assert s.status == 200 and s.error is None and s.events[-1] == "[DONE]", (s.status, s.error, s.events[-3:])
        assert [e["code"] for e in s.errors] == ["engine_unavailable"], s.errors
    detected = max(s.ended_at for s in cut) - lost

    def replaced() -> bool:
        now = replica_nodes(APP)
        return (len(now) == 2 and survivor in now and victim_replica not in now
                and len(set(now.values())) == 2 and set(now.values()) <= live_nodes())

    assert wait_until(replaced, 600, 0.5), replica_nodes(APP)
    new = set(replica_nodes(APP))
    assert wait_until(lambda: served_by_each(cluster.url, new), 600, 0)
    recovered = time.monotonic() - lost
    results = trickle.stop()
    failed = [(round(t - lost, 1), status, code) for t, status, code in results if status != 200]
    # New requests meanwhile: any that fail get a clear 503 (no hang, no 500).
    assert all(status == 503 and code == "engine_unavailable" for _, status, code in failed), failed
    print(f"\nnode lost: in-flight streams cut {len(cut)}/{len(streams)}, detected after {detected:.1f} s; "
          f"replica replaced and serving after {recovered:.1f} s; new requests failed {len(failed)}/"
          f"{len(results)} {failed}")
    cluster.add_node()  # back to three nodes, as an operator would


# --- a parallel group over two nodes -----------------------------------------------------------------
REFERENCE_CONTEXT = 256


def group_nodes() -> tuple[dict[str, str], list[str]]:
    return replica_nodes(APP), actor_nodes("Rank")


def spans_two_nodes(replica: dict[str, str], ranks: list[str]) -> bool:
    """One replica (rank 0) and one Rank actor (rank 1), on two different live nodes."""
    nodes = [*replica.values(), *ranks]
    return len(replica) == 1 and len(ranks) == 1 and len(set(nodes)) == 2 and set(nodes) <= live_nodes()


def assert_golden(url: str, golden: dict) -> None:
    for j in sorted(int(k.split("_")[1]) for k in golden if k.startswith("prompt_")):
        body = {"model": "grok-test", "prompt": golden[f"prompt_{j}"].tolist(), "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        out = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert out.status_code == 200, out.text
        assert out.json()["choices"][0]["token_ids"] == golden[f"greedy_{j}"].tolist(), f"prompt {j}"


def test_parallel_group_spans_two_nodes_and_matches_the_golden_tokens(cluster):
    model = reference_tiny_or_skip()
    golden = dict(np.load(model / "golden_float32.npz"))
    serve.delete(APP)
    deploy(engine_config(
        engine={"model": str(model), "dtype": "float32", "parallel_size": 2, "placement_strategy": "STRICT_SPREAD",
                "max_model_len": REFERENCE_CONTEXT},
        engine_deployment={"num_replicas": 1, "max_replicas_per_node": None}))
    assert spans_two_nodes(*group_nodes()), group_nodes()
    assert_golden(cluster.url, golden)


def test_losing_a_node_of_the_group_replaces_the_whole_group(cluster):
    golden = dict(np.load(reference_tiny_or_skip() / "golden_float32.npz"))
    replica, ranks = group_nodes()
    assert spans_two_nodes(replica, ranks), (replica, ranks)
    (old_replica, replica_node), rank_node = next(iter(replica.items())), ranks[0]
    lost = next(n for n in (replica_node, rank_node) if n != head_node(cluster))
    streams = [Stream(cluster.url, [5 + i, 6, 7], context=REFERENCE_CONTEXT) for i in range(2)]
    assert all(s.started.wait(600) for s in streams)
    trickle = Trickle(cluster.url)  # an idle group hears of a lost rank at its next step: keep steps coming
    cluster.cluster.remove_node(next(w for w in cluster.workers if w.node_id == lost), allow_graceful=False)
    for s in streams:
        assert s.join(1200), "a stream hung after a node of its group was lost"
        assert s.completed or ([e["code"] for e in s.errors] == ["engine_unavailable"] and s.events[-1] == "[DONE]"), \
            (s.status, s.error, s.events[-3:])

    def regrouped() -> bool:
        now, ranks = group_nodes()
        return old_replica not in now and spans_two_nodes(now, ranks)

    assert wait_until(regrouped, 600, 1.0), group_nodes()
    results = trickle.stop()
    assert all(status == 200 or (status == 503 and code == "engine_unavailable") for _, status, code in results), \
        results
    assert_golden(cluster.url, golden)  # the new group, both ranks again, over the surviving nodes
    cluster.add_node()
    serve.delete(APP)
    assert wait_until(lambda: not actor_nodes("Rank"), 300, 0.5), "rank 1 outlived its replica"


# --- autoscaling under load --------------------------------------------------------------------------
def running_replicas() -> int:
    status = serve.status().applications[APP].deployments["GrokEngine"]
    return status.replica_states.get("RUNNING", 0)


def test_autoscaling_follows_a_locust_load(cluster, tmp_path):
    deploy(engine_config(engine_deployment={
        "num_replicas": 1,
        # A replica holding more than 2 requests on average asks for another; the look-back and delays
        # are short so that the test waits seconds, not minutes, for each decision.
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                        "upscale_delay_s": 0, "downscale_delay_s": 5, "look_back_period_s": 12}}))
    assert running_replicas() == 1 and len(replica_nodes(APP)) == 1
    # The scenario's users hold 6 long streams open for as long as it runs; the test ends the run once
    # the second replica serves.
    scenario = lt.load_scenario(lt.REPO / "loadtests" / "scenarios" / "autoscale.yaml")
    outcome: dict = {}
    locust = threading.Thread(target=lambda: outcome.update(lt.run_locust(cluster.url, scenario, tmp_path, "up")))
    locust.start()
    try:
        assert wait_until(lambda: running_replicas() == 2, 600, 1.0), serve.status()
        replicas = set(replica_nodes(APP))
        assert len(replicas) == 2 and len(set(replica_nodes(APP).values())) == 2
        done = lambda: per_replica(cluster.url, "grok_serve:request_success_total")
        assert wait_until(lambda: all(done().get(r, 0) > 0 for r in replicas), 600, 1.0), done()
        trickle = Trickle(cluster.url)  # new requests go on through the scale-down
    finally:
        for child in psutil.Process().children(recursive=True):
            try:
                if "locust" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGTERM)  # locust writes its summary and exits
            except psutil.Error:  # a child that has exited meanwhile
                continue
        locust.join(600)
    # Load gone: Serve drains one replica and stops it.
    assert wait_until(lambda: running_replicas() == 1 and len(replica_nodes(APP)) == 1, 600, 1.0), serve.status()
    results = trickle.stop()
    assert outcome, "locust wrote no summary"
    assert outcome["requests_failed"] == 0 and outcome["failure_rows"] == [], outcome["failures"]
    assert outcome["requests_rejected"] == 0 and outcome["requests_ok"] > 0
    assert results and all(status == 200 for _, status, _ in results), results
    print(f"\nautoscaling: 1 -> 2 -> 1 replicas; locust {outcome['requests_ok']} ok, {outcome['requests_failed']} "
          f"failed, {outcome['requests_rejected']} rejected; requests through the scale-down {len(results)}, "
          f"failed {sum(status != 200 for _, status, _ in results)}")
    serve.delete(APP)
