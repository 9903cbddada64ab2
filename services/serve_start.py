"""Starting Ray Serve where its HTTP proxy may be slow to come up.

`serve.start` waits a fixed 60 s for the proxy actor (HTTP_PROXY_TIMEOUT in
ray/serve/_private/constants.py, not configurable) and then raises TimeoutError, while the controller
and the starting proxy stay up. On a machine whose CPU is shared with busy processes the proxy has
taken 63 s. `start_serve` keeps waiting on the same controller (a repeated `serve.start` finds it and
returns at once) and then until the proxy accepts connections.
"""
from __future__ import annotations

import socket
import time


def start_serve(http_options: dict, timeout_s: float = 600.0, **options) -> None:
    """serve.start(http_options=..., **options), waiting up to timeout_s for the proxy to listen."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            serve.start(http_options=http_options, **options)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    host = http_options.get("host", "127.0.0.1")
    wait_for_listener("127.0.0.1" if host in ("0.0.0.0", "::") else host, http_options["port"], deadline)


def wait_for_listener(host: str, port: int, deadline: float) -> None:
    """Until something accepts TCP connections on host:port, or TimeoutError at `deadline` (monotonic)."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.5)
