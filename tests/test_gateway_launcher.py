"""`grok-serve up` as a user runs it: a subprocess that serves until SIGTERM, then drains and exits."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_gateway_support import free_port

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]


def test_up_serves_until_sigterm_and_lets_streams_finish():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "services.cli", "up", "--port", str(port),
               "--max-model-len", "512", "--kv-cache-memory-bytes", str(16 << 20), "--engine-num-cpus", "0.5"]
    # A session of its own: the signal reaches only the launcher, as a service manager would send it.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 150
        while not any("Press Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"grok-serve up exited early: {lines}"
            lines.append(line)
            assert time.monotonic() < deadline, lines
        assert f"http://127.0.0.1:{port}/v1" in "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health", timeout=30).status_code == 200

        events = []
        started = threading.Event()

        def stream():
            body = {"prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        reader.join(timeout=30)
        assert events[-1] == "[DONE]", events[-3:]  # the in-flight stream was allowed to finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
