"""start_serve outlasts Serve's fixed 60 s wait for its proxy (services/serve_start.py)."""
from __future__ import annotations

import socket
import time

import pytest

from services import serve_start

serve = pytest.importorskip("ray.serve")


def test_a_timed_out_start_is_retried_until_the_proxy_listens(monkeypatch):
    calls = []

    def start(http_options, **options):
        calls.append(http_options)
        if len(calls) == 1:
            raise TimeoutError("HTTP proxies not available after 60s.")

    monkeypatch.setattr(serve, "start", start)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        options = {"host": "0.0.0.0", "port": listener.getsockname()[1]}
        serve_start.start_serve(options, timeout_s=600)
    assert calls == [options, options]


def test_gives_up_at_the_deadline(monkeypatch):
    def start(http_options, **options):
        raise TimeoutError("HTTP proxies not available after 60s.")

    monkeypatch.setattr(serve, "start", start)
    with pytest.raises(TimeoutError, match="proxies"):
        serve_start.start_serve({"host": "127.0.0.1", "port": 1}, timeout_s=0)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(TimeoutError, match="nothing listens"):
            serve_start.wait_for_listener("127.0.0.1", port, deadline=time.monotonic())
