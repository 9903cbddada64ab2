"""preStop hook of grok-serve's Ray pods: turn a pod's termination into a Serve drain.

SIGTERM stops Ray at once, and with it every stream the pod serves. So before it comes:

  worker  asks Ray to drain this node with a deadline. Serve then starts a replacement for each
          replica here on another node, and stops the one here gracefully (in-flight requests finish)
          once the replacement runs, or at the latest at deadline - graceful_shutdown_timeout_s. The
          hook returns when no replica is left on the node, or at the deadline.
  head    cannot be drained, but GCS lives here: when the whole cluster goes (the old cluster of an
          upgrade) the head stays up while the workers drain. If no worker starts draining soon, only
          the head is going, and the hook returns at once.

It reads Serve's state from the dashboard's REST API (what KubeRay reads) and drains with
`ray drain-node` (what autoscaler v2 uses). Any failure ends the hook: a hook that cannot drain must
not hold the pod either.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

# States of a replica that still holds requests (Serve's ReplicaState names).
_LIVE = {"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION", "STOPPING"}
# How long the head waits to see a worker drain before concluding it goes alone.
_HEAD_SETTLE_S = 20.0


def log(message: str) -> None:
    print(f"grok-serve drain: {message}", file=sys.stderr, flush=True)


def dashboard_url(role: str) -> str:
    host = "127.0.0.1" if role == "head" else os.environ.get("FQ_RAY_IP") or os.environ.get("RAY_IP")
    if not host:
        raise RuntimeError("FQ_RAY_IP is not set: not a KubeRay worker pod")
    return f"http://{host}:{os.environ.get('GROK_SERVE_DASHBOARD_PORT', '8265')}"


def serve_details(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/serve/applications/", timeout=5) as response:
        return json.load(response)


def replicas(details: dict) -> list[dict]:
    """Every live replica of every application: its state, node id and node IP."""
    found = []
    for app in (details.get("applications") or {}).values():
        for deployment in (app.get("deployments") or {}).values():
            found += [r for r in deployment.get("replicas") or [] if r.get("state") in _LIVE]
    return found


def local_node_id(details: dict) -> str:
    """This pod's Ray node: the Serve proxy (one per node) whose IP is the pod's."""
    ip = socket.gethostbyname(socket.gethostname())
    for node_id, proxy in (details.get("proxies") or {}).items():
        if proxy.get("node_ip") == ip:
            return node_id
    for replica in replicas(details):
        if replica.get("node_ip") == ip:
            return replica["node_id"]
    raise RuntimeError(f"no Serve proxy or replica on {ip}: nothing to drain")


def drain_worker(url: str, deadline: float) -> None:
    details = serve_details(url)
    node_id = local_node_id(details)
    remaining = max(0, int(deadline - time.monotonic()))
    subprocess.run(["ray", "drain-node", "--address", "auto", "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", f"pod {socket.gethostname()} is terminating",
                    "--deadline-remaining-seconds", str(remaining)],
                   check=True, timeout=60, capture_output=True, text=True)
    log(f"node {node_id} draining, deadline in {remaining} s")
    while time.monotonic() < deadline:
        left = [r for r in replicas(serve_details(url)) if r.get("node_id") == node_id]
        if not left:
            log("no replica left on this node")
            return
        time.sleep(2)
    log("deadline reached with replicas still on this node")


def wait_for_workers(url: str, deadline: float) -> None:
    settle_until = time.monotonic() + _HEAD_SETTLE_S
    seen_drain = False
    while time.monotonic() < deadline:
        # Proxies are no sign: Serve drains the proxy of any node left without replicas.
        draining = [r for r in replicas(serve_details(url)) if r.get("state") in ("PENDING_MIGRATION", "STOPPING")]
        if draining:
            seen_drain = True
        elif seen_drain or time.monotonic() > settle_until:
            log("no worker draining: the head goes on its own" if not seen_drain else "workers drained")
            return
        time.sleep(2)
    log("deadline reached while workers still drain")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("head", "worker"), required=True)
    parser.add_argument("--deadline-s", type=int, required=True, help="seconds this hook may take")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline_s
    try:
        url = dashboard_url(args.role)
        if args.role == "worker":
            drain_worker(url, deadline)
        else:
            wait_for_workers(url, deadline)
    except subprocess.CalledProcessError as exc:
        log(f"ray drain-node failed: {(exc.stderr or exc.stdout or '').strip()[-500:]}")
    except Exception as exc:  # noqa: BLE001 - any failure ends the hook; the pod then stops as it would have
        log(f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
