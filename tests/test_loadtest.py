"""The load-test harness end to end: a real `grok-serve up --model tiny`, a real headless locust run."""
from __future__ import annotations

import subprocess
import sys

import pytest

from loadtests import chart, server_side
from loadtests import run as lt

pytestmark = pytest.mark.timeout(900)  # a hang guard; a starved machine starts Ray slowly

# Small engine settings keep start-up and memory low on a 2-core machine.
TINY = {"model": "tiny", "max_model_len": 512, "kv_cache_memory_bytes": 16 << 20}


# Importing locust monkey-patches the standard library for gevent, so the locustfile's helpers are
# checked in a process of their own rather than inside the test run.
LOCUSTFILE_CHECKS = r"""
import json, random, sys
from loadtests import locustfile as lf
rng = random.Random(0)
assert lf.LengthDist("32").sample(rng) == 32
assert lf.LengthDist("fixed:7").sample(rng) == 7
assert {lf.LengthDist("uniform:3:5").sample(rng) for _ in range(200)} == {3, 4, 5}
assert lf.LengthDist("file").sample(rng, from_file=9) == 9
for bad in ("uniform:5:3", "fixed:0", "normal:3:1", "file:3"):
    try:
        lf.LengthDist(bad)
    except ValueError:
        pass
    else:
        raise AssertionError(bad)
assert lf.load_prompt_file(sys.argv[1]) == [
    {"prompt": [5, 6, 7], "max_tokens": 4}, {"prompt": "plain text line", "max_tokens": None},
    {"prompt": [1, 2], "max_tokens": None}]
assert len(lf._resize([5, 6, 7], 5, rng, 100)) == 5 and lf._resize([5, 6, 7], 2, rng, 100) == [5, 6]
assert lf.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
assert lf._choice_tokens({"text": "", "token_ids": [1, 2]}, chat=False) == 2
assert lf._choice_tokens({"delta": {"role": "assistant", "content": ""}}, chat=True) == 0
assert lf._choice_tokens({"delta": {"content": "x"}}, chat=True) == 1
print("ok")
"""


def test_locustfile_helpers(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [5, 6, 7], "max_tokens": 4}\nplain text line\n[1, 2]\n')
    done = subprocess.run([sys.executable, "-c", LOCUSTFILE_CHECKS, str(prompts)], cwd=lt.REPO, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_scenarios_load_and_map_to_locust_options():
    for path in sorted((lt.REPO / "loadtests" / "scenarios").glob("*.yaml")):
        scenario = lt.load_scenario(path)
        options = lt.locust_options(scenario)
        assert "--endpoint" in options, path
    steady = lt.load_scenario(lt.REPO / "loadtests" / "scenarios" / "steady.yaml", {"users": 2})
    assert steady["users"] == 2 and steady["name"] == "steady"
    with pytest.raises(ValueError):
        lt.load_scenario(None, {"no_such_key": 1})
    assert lt._seconds("1m30s") == 90 and lt._seconds(12) == 12


def test_steady_chat_stream_against_tiny_server(tmp_path):
    scenario = lt.load_scenario(None, {
        "name": "steady-test", "users": 3, "run_time": "10s", "endpoint": "chat", "stream": True,
        "prompt_tokens": "uniform:8:24", "output_tokens": "uniform:8:16", "stop_timeout": 10})
    with lt.start_ours(TINY, tmp_path, timeout_s=180) as server:
        lt.warm_up(server.url, scenario)
        before = server_side.scrape(server.url)
        summary = lt.run_locust(server.url, scenario, tmp_path, "steady")
        measured = server_side.split(before, server_side.scrape(server.url), 10.0)
    # The server's own counters split the tokens the client saw.
    assert measured["steps"] > 0 and measured["tokens_per_step"] >= 1
    assert 0 < measured["forward_ms"] <= measured["step_ms"]
    assert measured["engine_itl_ms"] > 0 and measured["engine_ttft_ms"] > 0
    row = {"target": "ours", "scenario": "steady", "users": 3, "summary": summary, "server_side": measured}
    assert "| engine ITL mean ms |" in lt.markdown([row])
    png = chart.write([row, {**row, "users": 6}], tmp_path / "chart.png", "steady")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["requests_failed"] == 0, summary["failures"]
    assert summary["failure_rows"] == []
    assert summary["requests_rejected"] == 0
    assert summary["requests_ok"] >= 3
    assert summary["ttft"]["count"] == summary["requests_ok"] and summary["ttft"]["p50"] > 0
    assert summary["itl"]["count"] > 0 and summary["itl"]["p99"] >= summary["itl"]["p50"]
    assert summary["output_tokens"]["min"] >= 8 and summary["output_tokens"]["max"] <= 16
    assert summary["output_tok_per_s"] > 0
    assert summary["locust_exit_code"] == 0
    # Locust's own reports carry the custom metrics too.
    stats = (tmp_path / "steady_stats.csv").read_text()
    for metric in ("TTFT", "ITL", "TPOT", "E2E", "OUTPUT_TOKENS"):
        assert f"{metric},chat stream" in stats
    assert (tmp_path / "steady.html").stat().st_size > 0
    assert "| url |" not in lt.markdown([{"target": "ours", "scenario": "s", "users": 3, "summary": summary}])


def test_overload_rejects_with_429_or_503_and_fails_nothing(tmp_path):
    scenario = lt.load_scenario(lt.REPO / "loadtests" / "scenarios" / "overload.yaml",
                                {"users": 8, "run_time": "10s", "stop_timeout": 15})
    settings = {**TINY, **scenario["server"]}
    assert settings["max_queued_requests"] == 1 and settings["max_ongoing_requests"] == 1
    with lt.start_ours(settings, tmp_path, timeout_s=180) as server:
        summary = lt.run_locust(server.url, scenario, tmp_path, "overload")
    assert summary["requests_rejected"] > 0
    assert set(summary["rejections"]) <= {"429", "503"}
    assert summary["requests_failed"] == 0, summary["failures"]
    assert summary["failure_rows"] == []
    assert summary["requests_ok"] > 0 and summary["ttft"]["count"] == summary["requests_ok"]
