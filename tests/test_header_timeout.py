"""The header-read timeout that the proxy callback adds to uvicorn (services/gateway/header_timeout.py),
on both of uvicorn's HTTP/1.1 implementations, in a server process of its own (the extension changes
uvicorn's classes for the whole process), and through Ray Serve's proxy in tests/test_serve_app.py."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.test_gateway_support import free_port

SERVER = """
import sys, uvicorn
from services.gateway import header_timeout
assert header_timeout.install(float(sys.argv[3]))

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], log_level="warning")
"""
TIMEOUT_S = 5  # far above the time a client takes between connecting and sending its headers


def read_until_closed(sock: socket.socket, deadline_s: float = 300) -> bytes:
    sock.settimeout(deadline_s)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"server did not start: {proc.poll()}")


@pytest.fixture(params=["h11", "httptools"])
def server_port(request):
    pytest.importorskip(request.param)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), request.param, str(TIMEOUT_S)])
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_headers_that_never_finish_get_408_and_a_closed_connection(server_port):
    with socket.create_connection(("127.0.0.1", server_port)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        assert read_until_closed(slow).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    with socket.create_connection(("127.0.0.1", server_port)) as silent:
        assert read_until_closed(silent).startswith(b"HTTP/1.1 408 ")


def test_complete_requests_are_untouched_and_keep_alive_rearms(server_port):
    with socket.create_connection(("127.0.0.1", server_port)) as conn:
        for _ in range(2):  # the second request on the same connection, after the first response
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(300)
            response = b""
            while not response.endswith(b"ok"):
                response += conn.recv(4096)
            assert response.startswith(b"HTTP/1.1 200 ")
        conn.sendall(b"GET / HTTP/1.1\r\n")  # a third that stalls: timed out like a first one
        assert b"HTTP/1.1 408 " in read_until_closed(conn)
