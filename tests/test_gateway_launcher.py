"""`grok-serve up` as a user runs it: a subprocess that serves until SIGTERM, then drains and exits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_gateway_support import free_port, wait_until

pytestmark = pytest.mark.timeout(1500)

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 2048  # the tiny preset's whole context
PROMPTS = 4  # sequences in the stream below, each decoding to the end of the context


def test_sigterm_drains_streams_finish_and_new_requests_get_503(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A drain longer than any machine needs for the stream below: finishing it is what is tested.
    config = tmp_path / "drain.yaml"
    config.write_text("engine_deployment: {graceful_shutdown_timeout_s: 900}\n"
                      "gateway_deployment: {graceful_shutdown_timeout_s: 900}\n")
    command = [sys.executable, "-m", "services.cli", "up", "--config", str(config), "--port", str(port),
               "--max-model-len", str(CONTEXT), "--kv-cache-memory-bytes", str(64 << 20),
               "--engine-num-cpus", "0.5"]
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
            # Each sequence runs to the end of the context (thousands of tokens in all), so the request
            # still streams while the drain starts and the refusals below are seen.
            body = {"prompt": [[7 + i] for i in range(PROMPTS)], "max_tokens": CONTEXT - 1, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=900) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)

        refused = []

        def new_requests_refused() -> bool:
            response = httpx.post(base + "/v1/completions", json={"prompt": [7], "max_tokens": 1}, timeout=30)
            refused.append(response.status_code)
            return response.status_code == 503

        assert wait_until(new_requests_refused, 60, 0.1), refused
        assert events[-1] != "[DONE]"  # refusals came while the stream still ran
        body = httpx.post(base + "/v1/completions", json={"prompt": [7], "max_tokens": 1}, timeout=30).json()
        assert body["error"]["type"] == "service_unavailable_error", body
        assert httpx.get(base + "/health", timeout=30).status_code == 503

        reader.join(timeout=1000)
        assert proc.wait(timeout=1000) == 0
        assert events[-1] == "[DONE]", events[-3:]  # the in-flight stream was allowed to finish
        finished = {c["index"]: c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]
                    if c.get("finish_reason")}
        assert finished == {i: "length" for i in range(PROMPTS)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
