"""Helpers the Ray Serve tests share (no tests here)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.gateway.config import AppConfig
from tests.test_gateway_support import free_port


@contextlib.contextmanager
def served_app(config: AppConfig, app_name: str) -> Iterator[str]:
    """The application on a local Ray (2 CPUs) and Serve on 127.0.0.1 and a free port; yields its URL
    and shuts both down afterwards."""
    import ray
    from ray import serve

    from services.serve_app import build_application

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="grok-serve-tests")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(config), name=app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
