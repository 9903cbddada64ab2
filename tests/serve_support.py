"""Helpers the Ray Serve tests share (no tests here)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from services.gateway.config import AppConfig
from tests.test_gateway_support import free_port

PATIENT_SERVE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "300", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120"}


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
    # address="local": a Ray already running on this machine (ray start) is not the tests' to use.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="grok-serve-tests")
    try:
        start_serve({"host": "127.0.0.1", "port": port})
        serve.run(build_application(config), name=app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
