"""Helpers the Ray Serve tests share (no tests here)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services.gateway.config import AppConfig
from tests.test_gateway_support import free_port

PATIENT_SERVE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "300", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120"}


def start_local_ray(attempts: int = 3, **options) -> None:
    """ray.init of a new local Ray (address="local": one that `ray start` left on this machine is not
    the tests' to use). Ray gives its raylet a fixed 30 s to register (ray/_private/node.py); on a
    starved machine that has run out, so a start that timed out is tried again."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(address="local", **options)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
            ray.shutdown()


@contextlib.contextmanager
def served_app(config: AppConfig, app_name: str) -> Iterator[str]:
    """The application on a local Ray (2 CPUs) and Serve on 127.0.0.1 and a free port; yields its URL
    and shuts both down afterwards."""
    import ray
    from ray import serve

    from services.serve_app import build_application
    from services.serve_start import start_serve

    port = free_port()
    # Serve gives its proxy 5 s to come up and 10 s per health check, then replaces it: on a starved
    # machine (one core shared with a busy process) that kills a healthy proxy. The tests wait instead.
    for name, value in PATIENT_SERVE.items():  # the local Ray started below passes them to Serve's actors
        os.environ.setdefault(name, value)
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="grok-serve-tests")
    try:
        start_serve({"host": "127.0.0.1", "port": port})
        serve.run(build_application(config), name=app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class LocalCluster:
    """A Ray cluster of real nodes (raylets with their own resources and object stores) on this machine,
    all on 127.0.0.1, with Serve's HTTP proxy on the head only (the node a test never removes)."""

    cluster: Any  # ray.cluster_utils.Cluster
    url: str

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def add_node(self, num_cpus: int = 1) -> Any:
        node = self.cluster.add_node(num_cpus=num_cpus, node_ip_address="127.0.0.1")
        self.cluster.wait_for_nodes(timeout=300)
        return node


@contextlib.contextmanager
def local_cluster(nodes: int, num_cpus: int = 1, head_resources: dict[str, float] | None = None
                  ) -> Iterator[LocalCluster]:
    """`nodes` Ray nodes of `num_cpus` logical CPUs each (Ray takes whole numbers per node; replicas and
    ranks take fractions), the head with `head_resources` besides, Serve on the head's 127.0.0.1 and a
    free port; everything stopped afterwards."""
    import ray
    from ray import serve
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from services.serve_start import start_serve

    for name, value in PATIENT_SERVE.items():  # the raylets started below pass them to Serve's actors
        os.environ.setdefault(name, value)
    # A driver joining by address swaps 127.0.0.1 for the host's outward IP, where nothing listens:
    # Ray keeps the loopback address when "clusters" are off, the setting it has on macOS and Windows.
    outward = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": num_cpus, "node_ip_address": "127.0.0.1", "gcs_server_port": free_port(),
        "include_dashboard": False, "resources": head_resources or {}})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=num_cpus, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes(timeout=300)
        ray.init(address=cluster.address, namespace="grok-serve-tests", log_to_driver=False)
        port = free_port()
        start_serve({"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield LocalCluster(cluster, f"http://127.0.0.1:{port}")
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            cluster.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = outward


def replica_nodes(app_name: str, deployment: str = "GrokEngine") -> dict[str, str]:
    """Replica id (the `replica` label of the metrics) -> the node id it runs on, for the live replicas of
    one deployment, from Ray's actor table in GCS (Serve names a replica's actor after its id)."""
    import ray._private.state

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return {a["Name"][len(prefix):]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["Name"].startswith(prefix) and a["State"] == "ALIVE"}


def actor_nodes(class_name: str) -> list[str]:
    """The nodes of the live actors of one class (the ranks of parallel groups: class Rank)."""
    import ray._private.state

    return [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]
