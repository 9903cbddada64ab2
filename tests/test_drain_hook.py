"""The chart's preStop hook (helm/grok-serve/files/drain_node.py) against a scripted Serve: what it asks
Ray to drain, when it lets the pod go, and that no failure keeps a pod from stopping.

Serve's state is what the dashboard's REST API answers (`GET /api/serve/applications/`); the clock is
a fake one that only the hook's own sleeps move.
"""
from __future__ import annotations

import importlib.util
import subprocess
import urllib.error
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "helm" / "grok-serve" / "files" / "drain_node.py"
POD_IP, NODE, OTHER = "10.0.0.5", "a1" * 28, "b2" * 28


@pytest.fixture
def hook(monkeypatch):
    spec = importlib.util.spec_from_file_location("drain_node", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clock = {"now": 1000.0}
    monkeypatch.setattr(module.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(module.time, "sleep", lambda s: clock.__setitem__("now", clock["now"] + s))
    monkeypatch.setattr(module.socket, "gethostname", lambda: "grok-gpu-xyz")
    monkeypatch.setattr(module.socket, "gethostbyname", lambda name: POD_IP)
    monkeypatch.setenv("FQ_RAY_IP", "grok-head-svc.llm.svc.cluster.local")
    module.calls = []
    module.clock = clock

    def run(cmd, **kwargs):
        module.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(module.subprocess, "run", run)
    return module


def details(*replicas: tuple[str, str], proxies: dict | None = None) -> dict:
    """Serve's answer: replicas as (node id, state), a proxy per node that has one."""
    ips = {NODE: POD_IP, OTHER: "10.0.0.9"}
    listed = [{"node_id": n, "node_ip": ips[n], "state": s} for n, s in replicas]
    if proxies is None:
        proxies = {n: {"node_id": n, "node_ip": ip, "status": "HEALTHY"} for n, ip in ips.items()}
    return {"proxies": proxies,
            "applications": {"grok-serve": {"deployments": {"GrokEngine": {"replicas": listed}}}}}


def script_answers(monkeypatch, hook, answers: list[dict]) -> list[str]:
    """Serve answers these in turn (the last one from then on); returns the URLs asked."""
    asked = []

    def serve_details(url):
        asked.append(url)
        return answers[min(len(asked) - 1, len(answers) - 1)]

    monkeypatch.setattr(hook, "serve_details", serve_details)
    return asked


def test_worker_drains_its_own_node_and_waits_for_its_replicas(hook, monkeypatch):
    asked = script_answers(monkeypatch, hook, [
        details((NODE, "RUNNING"), (OTHER, "RUNNING")),
        details((NODE, "PENDING_MIGRATION"), (OTHER, "RUNNING"), (OTHER, "STARTING")),
        details((NODE, "STOPPING"), (OTHER, "RUNNING"), (OTHER, "RUNNING")),
        details((OTHER, "RUNNING"), (OTHER, "RUNNING")),
    ])
    assert hook.main(["--role", "worker", "--deadline-s", "320"]) == 0
    (drain,) = hook.calls
    assert drain[:2] == ["ray", "drain-node"]
    option = dict(zip(drain[2::2], drain[3::2]))
    assert option["--node-id"] == NODE
    assert option["--reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert 0 < int(option["--deadline-remaining-seconds"]) <= 320
    assert len(asked) == 4, "it returns as soon as no replica is left on the node"
    assert all(url.startswith("http://grok-head-svc.llm.svc.cluster.local:8265") for url in asked)


def test_worker_finds_its_node_by_a_replica_when_no_proxy_is_listed(hook, monkeypatch):
    script_answers(monkeypatch, hook, [details((NODE, "RUNNING"), proxies={}), details()])
    assert hook.main(["--role", "worker", "--deadline-s", "60"]) == 0
    assert hook.calls[0][hook.calls[0].index("--node-id") + 1] == NODE


def test_worker_without_replicas_has_nothing_to_drain(hook, monkeypatch):
    script_answers(monkeypatch, hook, [details((OTHER, "RUNNING"), proxies={})])
    assert hook.main(["--role", "worker", "--deadline-s", "60"]) == 0
    assert hook.calls == []


def test_worker_lets_the_pod_go_at_the_deadline(hook, monkeypatch):
    asked = script_answers(monkeypatch, hook, [details((NODE, "PENDING_MIGRATION"))])
    start = hook.clock["now"]
    assert hook.main(["--role", "worker", "--deadline-s", "30"]) == 0
    assert hook.clock["now"] - start <= 30 + 2
    assert len(asked) < 30


def test_head_alone_goes_after_a_short_look(hook, monkeypatch):
    asked = script_answers(monkeypatch, hook, [details((OTHER, "RUNNING"), (NODE, "RUNNING"))])
    start = hook.clock["now"]
    assert hook.main(["--role", "head", "--deadline-s", "320"]) == 0
    assert hook.calls == [], "the head is never drained"
    assert hook.clock["now"] - start <= hook._HEAD_SETTLE_S + 2
    assert asked[0].startswith("http://127.0.0.1:8265")


def test_head_outlives_draining_workers(hook, monkeypatch):
    asked = script_answers(monkeypatch, hook, [
        details((OTHER, "RUNNING")),
        details((OTHER, "PENDING_MIGRATION")),
        *[details((OTHER, "STOPPING"))] * 40,  # longer than the settle time: still waited for
        details(),
    ])
    assert hook.main(["--role", "head", "--deadline-s", "320"]) == 0
    assert len(asked) == 43


@pytest.mark.parametrize("failure", ["dashboard", "drain"])
def test_a_failing_drain_never_holds_the_pod(hook, monkeypatch, failure):
    if failure == "dashboard":
        def serve_details(url):
            raise urllib.error.URLError("connection refused")

        monkeypatch.setattr(hook, "serve_details", serve_details)
    else:
        script_answers(monkeypatch, hook, [details((NODE, "RUNNING"))])

        def run(cmd, **kwargs):
            raise subprocess.CalledProcessError(1, cmd, "", "The drain request is not accepted")

        monkeypatch.setattr(hook.subprocess, "run", run)
    assert hook.main(["--role", "worker", "--deadline-s", "320"]) == 0


def test_a_worker_pod_outside_kuberay_is_left_alone(hook, monkeypatch):
    monkeypatch.delenv("FQ_RAY_IP")
    monkeypatch.delenv("RAY_IP", raising=False)
    assert hook.main(["--role", "worker", "--deadline-s", "60"]) == 0
    assert hook.calls == []
