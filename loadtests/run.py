"""Run a load-test scenario against grok-serve, the vLLM peer or any OpenAI-compatible URL.

    python -m loadtests.run --scenario loadtests/scenarios/steady.yaml --target ours
    python -m loadtests.run --scenario loadtests/scenarios/steady.yaml --target http://127.0.0.1:8000
    python -m loadtests.run --compare --scenario loadtests/scenarios/compare.yaml \
        --concurrency 1,8,32 --run-time 30s

For `ours` and `vllm` the server is started on a free 127.0.0.1 port, awaited (`/health`), loaded with
locust headless for a bounded time and user count, and stopped. The output directory gets, per run,
locust's CSV and HTML reports and the locustfile's summary, plus `summary.json` and `summary.md` (one
table row per run).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests import chart, server_side

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
PEER_DIR = REPO / "loadtests" / "peers" / "vllm"
VLLM_VENV = Path(os.environ.get("VLLM_PEER_VENV", REPO / ".venv-vllm"))

# Scenario keys passed to the locustfile as --option value (see its options).
CLIENT_KEYS = ("endpoint", "model", "prompt_tokens", "output_tokens", "prompt_file", "prompt_format",
               "vocab_size", "ignore_eos", "return_token_ids", "include_usage", "temperature", "arrival",
               "rate", "think_time", "requests_per_user", "request_timeout", "seed")
DEFAULTS: dict[str, Any] = {
    "users": 4, "spawn_rate": None, "run_time": "30s", "stop_timeout": 5, "stream": True, "warmup": True,
    "endpoint": "chat", "server": {}, "vllm": {},
}


# --------------------------------------------------------------------------- scenarios

def load_scenario(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if path:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a scenario is a mapping")
        data.setdefault("name", Path(path).stem)
    scenario = {**DEFAULTS, **data}
    for key, value in (overrides or {}).items():
        if value is not None:
            scenario[key] = value
    scenario.setdefault("name", "adhoc")
    unknown = set(scenario) - set(DEFAULTS) - set(CLIENT_KEYS) - {"name", "description", "expect"}
    if unknown:
        raise ValueError(f"unknown scenario keys: {sorted(unknown)}")
    return scenario


def locust_options(scenario: dict[str, Any]) -> list[str]:
    args = ["--stream"] if scenario.get("stream") else []
    for key in CLIENT_KEYS:
        value = scenario.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


# --------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    startup_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM first (grok-serve drains and shuts its Ray instance down), then the whole process
        group, which is ours alone because the server was started in a session of its own."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_healthy(server: Server, timeout_s: float) -> None:
    start = time.monotonic()
    while True:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} during start-up; "
                               f"log: {server.log_path}\n{_tail(server.log_path)}")
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(server.url + path, timeout=5).status_code == 200:
                    server.startup_s = round(time.monotonic() - start, 1)
                    return
            except httpx.HTTPError:
                pass
        if time.monotonic() - start > timeout_s:
            server.stop()
            raise TimeoutError(f"{server.name} not healthy after {timeout_s:.0f} s; log: {server.log_path}\n"
                               f"{_tail(server.log_path)}")
        time.sleep(1.0)


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def start_ours(settings: dict[str, Any], out_dir: Path, timeout_s: float = 300) -> Server:
    """`grok-serve up` as a subprocess; `settings` are its flags without dashes (model, dtype,
    max_queued_requests, ...)."""
    port = free_port()
    exe = Path(sys.executable).with_name("grok-serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "services.cli"]
    cmd += ["up", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in {"model": "tiny", **settings}.items():
        if value is not None:
            cmd += ["--" + key.replace("_", "-"), str(value)]
    # A cluster named by RAY_ADDRESS would outlive the run; the harness wants its own local Ray.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = out_dir / f"server-ours-{port}.log"
    server = Server("grok-serve", f"http://127.0.0.1:{port}", _spawn(cmd, log, env), log,
                    info={"command": " ".join(cmd)})
    try:
        wait_healthy(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def mixtral_dims(preset: str) -> dict[str, Any]:
    """The Mixtral shape of one of our presets, for the vLLM peer."""
    from services.model.config import get_preset

    c = get_preset(preset)
    return {"hidden_size": c.emb_size, "intermediate_size": c.ffn_size, "num_attention_heads": c.num_q_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.key_size, "num_hidden_layers": c.num_layers,
            "num_local_experts": c.num_experts, "num_experts_per_tok": c.num_selected_experts,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len}


def start_vllm(settings: dict[str, Any], out_dir: Path, timeout_s: float = 900) -> Server:
    """vLLM's OpenAI server from the peer virtualenv: Mixtral with our preset's dimensions, dummy
    weights, no tokenizer (so clients must send token-id prompts to /v1/completions)."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} not found: run loadtests/peers/vllm/setup.sh")
    preset = settings.get("model", "cpu-bench")
    dtype = settings.get("dtype", "float32")
    # A stable directory: vLLM keys its compile cache on the model path.
    model_dir = Path(tempfile.gettempdir()) / f"vllm-peer-loadtest-{preset}-{dtype}"
    dims_file = out_dir / f"vllm-dims-{preset}.json"
    dims_file.parent.mkdir(parents=True, exist_ok=True)
    dims_file.write_text(json.dumps(mixtral_dims(preset)))
    subprocess.run([str(python), str(PEER_DIR / "mixtral_config.py"), str(model_dir), "--from-json",
                    str(dims_file), "--dtype", dtype, "--quiet"], check=True, capture_output=True, text=True)
    port = free_port()
    cmd = [str(python), str(PEER_DIR / "vllm_cli.py"), "serve", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", dtype,
           "--max-model-len", str(settings.get("max_model_len", 2048)), "--served-model-name", preset]
    if settings.get("enforce_eager", True):
        cmd.append("--enforce-eager")
    cmd += [str(a) for a in settings.get("extra_args", [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.get("kv_cache_gib", 4)))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(settings.get("threads_bind", "auto")))
    log = out_dir / f"server-vllm-{port}.log"
    # Not the repository: vLLM's subprocesses put their working directory on sys.path, where an
    # editable install's grok_serve.egg-info would register our vLLM plugin in an environment that
    # lacks our dependencies.
    server = Server("vllm", f"http://127.0.0.1:{port}", _spawn(cmd, log, env, cwd=out_dir.resolve()), log,
                    info={"command": " ".join(cmd), "model_dir": str(model_dir)})
    try:
        wait_healthy(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def warm_up(url: str, scenario: dict[str, Any], api_key: str = "") -> None:
    """One small request, so one-time costs (first forward, lazy allocations) stay out of the numbers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = scenario.get("model") or httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": True}
    httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=600)


# --------------------------------------------------------------------------- locust

def run_locust(url: str, scenario: dict[str, Any], out_dir: Path, tag: str, api_key: str = "") -> dict[str, Any]:
    """One headless locust run; returns the summary (the locustfile's, plus the failures CSV)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / tag
    users = int(scenario["users"])
    spawn_rate = scenario.get("spawn_rate") or users
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", url,
           "-u", str(users), "-r", str(spawn_rate), "-t", str(scenario["run_time"]),
           "--stop-timeout", str(scenario.get("stop_timeout", 5)), "--only-summary",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--summary-json", f"{prefix}_summary.json",
           *locust_options(scenario)]
    env = dict(os.environ)
    if api_key:
        env["LT_API_KEY"] = api_key
    budget = _seconds(scenario["run_time"]) + float(scenario.get("stop_timeout", 5)) + 120
    started = time.monotonic()
    with open(f"{prefix}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=budget,
                              check=False)
    summary_path = Path(f"{prefix}_summary.json")
    if not summary_path.exists():
        raise RuntimeError(f"locust wrote no summary (exit {proc.returncode}); log: {prefix}.log\n"
                           f"{_tail(Path(f'{prefix}.log'))}")
    summary = json.loads(summary_path.read_text())
    summary["locust_exit_code"] = proc.returncode
    summary["locust_wall_s"] = round(time.monotonic() - started, 1)
    summary["failure_rows"] = _failure_rows(Path(f"{prefix}_failures.csv"))
    summary["reports"] = {"csv_prefix": str(prefix), "html": f"{prefix}.html", "log": f"{prefix}.log"}
    return summary


def _failure_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{"method": r["Method"], "name": r["Name"], "error": r["Error"], "count": int(r["Occurrences"])}
                for r in csv.DictReader(f)]


def _seconds(run_time: str | float) -> float:
    if isinstance(run_time, (int, float)):
        return float(run_time)
    total, number = 0.0, ""
    for ch in str(run_time).strip():
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number or 0) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
    return total + float(number or 0)


# --------------------------------------------------------------------------- reports

COLUMNS = ("target", "scenario", "users", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
           "E2E p50/p90/p99 ms", "ok", "rejected", "failed")


def table_row(row: dict[str, Any]) -> list[str]:
    s = row["summary"]

    def pct(metric: str) -> str:
        m = s.get(metric) or {}
        if not m.get("count"):
            return "-"
        return "/".join(f"{m[q]:.0f}" if m[q] >= 10 else f"{m[q]:.1f}" for q in ("p50", "p90", "p99"))

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) if d else "0"

    return [row["target"], row["scenario"], str(row["users"]), f"{s['req_per_s']:.2f}",
            f"{s['output_tok_per_s']:.1f}", pct("ttft"), pct("itl"), pct("e2e"), str(s["requests_ok"]),
            counts(s["rejections"]), counts(s["failures"])]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    split_rows = [r for r in rows if any(v is not None for v in (r.get("server_side") or {}).values())]
    if split_rows:
        lines += ["", ("Where a token's time goes (the server's own counters over the run, see "
                       "loadtests/server_side.py):"), "", "| " + " | ".join(SPLIT_COLUMNS) + " |",
                  "|" + "---|" * len(SPLIT_COLUMNS)]
        lines += ["| " + " | ".join(split_row(r)) + " |" for r in split_rows]
    return "\n".join(lines) + "\n"


SPLIT_COLUMNS = ("target", "users", "client ITL mean ms", "engine ITL mean ms", "engine to client ms",
                 "step ms", "forward ms", "tokens/step", "engine busy")


def split_row(row: dict[str, Any]) -> list[str]:
    m, itl = row["server_side"], (row["summary"].get("itl") or {})

    def f(value: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    client = itl.get("mean") if itl.get("count") else None
    gap = None if client is None or m.get("engine_itl_ms") is None else client - m["engine_itl_ms"]
    return [row["target"], str(row["users"]), f(client), f(m.get("engine_itl_ms")), f(gap), f(m.get("step_ms")),
            f(m.get("forward_ms")), f(m.get("tokens_per_step")), f(m.get("engine_busy"), "{:.0%}")]


def write_reports(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")
    text = markdown(rows)
    picture = chart.write(rows, out_dir / "summary.png", title=meta.get("scenario", ""))
    if picture:
        text += f"\n![scaling]({picture.name})\n"
    notes = [f"- {r['target']}: {r['server']['command']} (healthy after {r['server']['startup_s']} s)"
             for r in rows if r.get("server", {}).get("command")]
    (out_dir / "summary.md").write_text(
        f"# Load test {meta.get('scenario', '')}\n\n{text}\n" + ("\n".join(dict.fromkeys(notes)) + "\n" if notes else "")
        + f"\nCommand: `{meta.get('command', '')}`\n")
    print(text, end="")


# --------------------------------------------------------------------------- orchestration

def start_target(target: str, scenario: dict[str, Any], out_dir: Path, startup_timeout: float | None) -> Server:
    if target == "ours":
        return start_ours(scenario.get("server") or {}, out_dir, startup_timeout or 300)
    if target == "vllm":
        return start_vllm(scenario.get("vllm") or {}, out_dir, startup_timeout or 900)
    if target.startswith(("http://", "https://")):
        return Server("url", target.rstrip("/"))
    raise ValueError(f"--target must be ours, vllm or an http(s) URL, got {target!r}")


def client_for(target: str, scenario: dict[str, Any]) -> dict[str, Any]:
    """A server without a tokenizer (the vLLM peer) only takes token-id completions."""
    if target != "vllm":
        return scenario
    vocab = mixtral_dims((scenario.get("vllm") or {}).get("model", "cpu-bench"))["vocab_size"]
    return {**scenario, "endpoint": "completions", "prompt_format": "ids",
            "vocab_size": scenario.get("vocab_size") or vocab}


def run_target(target: str, scenario: dict[str, Any], out_dir: Path, users_list: list[int], api_key: str,
               startup_timeout: float | None) -> list[dict[str, Any]]:
    rows = []
    label = target if not target.startswith("http") else "url"
    client = client_for(target, scenario)
    with start_target(target, scenario, out_dir, startup_timeout) as server:
        if client.get("warmup", True):
            warm_up(server.url, client, api_key)
        for users in users_list:
            run = {**client, "users": users, "spawn_rate": client.get("spawn_rate") or users}
            tag = f"{label}-{scenario['name']}-u{users}"
            print(f"==> {tag}: {users} users for {run['run_time']} against {server.url}", flush=True)
            before = server_side.scrape(server.url, api_key)
            started = time.monotonic()
            summary = run_locust(server.url, run, out_dir, tag, api_key)
            measured = server_side.split(before, server_side.scrape(server.url, api_key),
                                         time.monotonic() - started)
            rows.append({"target": label, "scenario": scenario["name"], "users": users, "summary": summary,
                         "server_side": measured,
                         "server": {"url": server.url, "startup_s": server.startup_s, **server.info}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", help="scenario YAML (loadtests/scenarios/*.yaml)")
    p.add_argument("--target", default="ours", help="ours | vllm | http://HOST:PORT (default ours)")
    p.add_argument("--compare", action="store_true", help="run ours, then vllm, with the same client")
    p.add_argument("--concurrency", help="comma-separated user counts, one run each (default: the scenario's)")
    p.add_argument("--users", type=int)
    p.add_argument("--run-time", help="per run, e.g. 30s, 2m")
    p.add_argument("--model", help="preset for our server (and the peer's shape with --compare)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vllm-mode", choices=["eager", "compiled"],
                   help="the peer's execution mode (default: the scenario's enforce_eager)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--out", help="output directory (default loadtests/results/<scenario>-<time>)")
    p.add_argument("--startup-timeout", type=float)
    args = p.parse_args(argv)

    scenario = load_scenario(args.scenario, {"users": args.users, "run_time": args.run_time})
    for key in ("server", "vllm"):
        scenario[key] = dict(scenario.get(key) or {})
        if args.model:
            scenario[key]["model"] = args.model
        if args.dtype:
            scenario[key]["dtype"] = args.dtype
    if args.vllm_mode:
        scenario["vllm"]["enforce_eager"] = args.vllm_mode == "eager"
    users_list = ([int(u) for u in args.concurrency.split(",")] if args.concurrency else [int(scenario["users"])])
    out_dir = Path(args.out or REPO / "loadtests" / "results" / f"{scenario['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    targets = ["ours", "vllm"] if args.compare else [args.target]
    meta = {"scenario": scenario["name"], "command": " ".join(["python -m loadtests.run", *(argv or sys.argv[1:])]),
            "scenario_config": scenario, "loadavg_start": os.getloadavg()}
    rows: list[dict[str, Any]] = []
    status = 0
    for target in targets:
        try:
            rows += run_target(target, scenario, out_dir, users_list, args.api_key, args.startup_timeout)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError, httpx.HTTPError) as exc:
            print(f"error: {target}: {exc}", file=sys.stderr)
            meta.setdefault("errors", {})[target] = str(exc)
            status = 1
        # Partial results survive a later target's failure.
        write_reports(rows, out_dir, {**meta, "loadavg_end": os.getloadavg()})
    print(f"reports in {out_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
