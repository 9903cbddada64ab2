"""Helpers the Ray Serve tests share (no tests here)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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
