"""Locust load generator for any OpenAI-compatible server (grok-serve, vLLM, ...).

    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 8 -t 60s \
        --endpoint chat --stream --output-tokens uniform:16:64 --summary-json out/summary.json

Every request fires, besides its own row (`POST <endpoint>`, response time = end-to-end latency), one
locust event per measurement so that locust's CSV/HTML reports carry percentiles for them:

    TTFT           time to the first generated token (streaming only)
    ITL            gap between successive generated tokens (streaming only; a chunk carrying k tokens
                   counts as k gaps of 1/k of its delay)
    TPOT           (E2E - TTFT) / (output tokens - 1) when streaming, E2E / output tokens otherwise
    E2E            end-to-end latency of a successful request
    OUTPUT_TOKENS  output tokens of the request; "response time" is the token count, not milliseconds
    REJECTED       a 429 or 503 answer (load shedding); the row name is the status

A 429/503 is a rejection, not a failure: overload tests expect them. Anything else that is not a
complete 2xx answer (other statuses, transport errors, timeouts, an error event inside a stream, a
stream without `[DONE]`) is a failure of the `POST` row, with the error kind as message.

Every option below also reads an environment variable (LT_<OPTION>, e.g. LT_ENDPOINT=completions).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from locust import User, events, task
from locust.exception import StopUser

REJECTION_STATUSES = (429, 503)

# httpx logs every request at INFO, which drowns locust's own output at any useful rate.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Words that most BPE vocabularies keep whole, so a text prompt of N words is close to N tokens.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
    "it", "his", "an", "were", "are", "which", "this", "be", "has", "had", "not", "but", "or", "first",
    "one", "their", "its", "new", "after", "who", "they", "two", "her", "she", "been", "other", "when",
    "time", "during", "there", "into", "school", "more", "may", "years", "over", "only", "year", "most",
    "would", "world", "city", "some", "where", "between", "later", "three", "state", "such", "then",
    "national", "used", "made", "known", "under", "many", "university", "united", "while", "part",
    "season", "team", "these", "american", "than", "film", "second", "born", "south", "became",
    "states", "war", "through", "being", "including", "both",
)


# --------------------------------------------------------------------------- options

@events.init_command_line_parser.add_listener
def _add_options(parser):
    group = parser.add_argument_group("OpenAI load test", "what each simulated user sends")

    def opt(name: str, **kwargs):
        env = "LT_" + name.lstrip("-").replace("-", "_").upper()
        group.add_argument(name, env_var=env, **kwargs)

    opt("--endpoint", choices=["chat", "completions"], default="chat", help="API to call")
    opt("--stream", action="store_true", default=False, help="stream the answers (SSE)")
    opt("--model", default="", help="`model` field; empty: the first id from GET /v1/models")
    opt("--api-key", default="", help="Bearer token (also read from OPENAI_API_KEY)")
    opt("--prompt-tokens", default="fixed:32",
        help="prompt length distribution: N, fixed:N, uniform:LO:HI or file (lengths of --prompt-file)")
    opt("--output-tokens", default="fixed:32",
        help="max_tokens distribution: N, fixed:N, uniform:LO:HI or file (`max_tokens` of --prompt-file)")
    opt("--prompt-file", default="",
        help="prompts to sample from: text lines, or JSONL with `prompt` (text or token ids), optional "
             "`max_tokens`")
    opt("--prompt-format", choices=["ids", "text"], default="text",
        help="completions prompt as random token ids (exact lengths, servers without a tokenizer) or "
             "text (about one token per word); chat is always text")
    opt("--vocab-size", type=int, default=512, help="token ids are drawn from [3, vocab-size)")
    opt("--ignore-eos", type=_boolean, default=True,
        help="send ignore_eos so every answer has max_tokens tokens (true/false)")
    opt("--return-token-ids", type=_boolean, default=True,
        help="send return_token_ids (grok-serve/vLLM extension) to count streamed tokens exactly")
    opt("--include-usage", type=_boolean, default=True, help="send stream_options.include_usage")
    opt("--temperature", type=float, default=0.0)
    opt("--arrival", choices=["closed", "constant", "poisson"], default="closed",
        help="closed: each user sends its next request when the last one ends (fixed concurrency); "
             "constant / poisson: users together start --rate requests per second, evenly spaced or "
             "with exponential gaps")
    opt("--rate", type=float, default=0.0, help="requests per second of all users together (constant/poisson)")
    opt("--think-time", type=float, default=0.0, help="seconds between requests in closed mode")
    opt("--requests-per-user", type=int, default=0, help="stop a user after this many requests (0: no limit)")
    opt("--request-timeout", type=float, default=300.0, help="seconds per request")
    opt("--seed", type=int, default=0, help="seed of prompt/length sampling (user i uses seed + i)")
    opt("--summary-json", default="", help="write the run summary (exact percentiles, counts) here at exit")


def _boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


class LengthDist:
    """`N`, `fixed:N`, `uniform:LO:HI` (inclusive) or `file`."""

    def __init__(self, spec: str):
        self.spec = spec.strip()
        parts = self.spec.split(":")
        kind = parts[0] if not parts[0].isdigit() else "fixed"
        if kind == "fixed":
            self.kind, self.lo = "fixed", int(parts[-1])
            self.hi = self.lo
        elif kind == "uniform" and len(parts) == 3:
            self.kind, self.lo, self.hi = "uniform", int(parts[1]), int(parts[2])
        elif kind == "file" and len(parts) == 1:
            self.kind, self.lo, self.hi = "file", 0, 0
        else:
            raise ValueError(f"length distribution {spec!r}: use N, fixed:N, uniform:LO:HI or file")
        if self.kind != "file" and not 0 < self.lo <= self.hi:
            raise ValueError(f"length distribution {spec!r}: need 0 < LO <= HI")

    def sample(self, rng: random.Random, from_file: int | None = None) -> int:
        if self.kind == "file":
            if from_file is None:
                raise ValueError("a `file` length needs --prompt-file entries that carry it")
            return from_file
        return self.lo if self.kind == "fixed" else rng.randint(self.lo, self.hi)


def load_prompt_file(path: str) -> list[dict]:
    """Entries `{"prompt": str | list[int], "max_tokens": int | None}`."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item: Any = line
        if line.lstrip()[:1] in "{[":
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = line
        if isinstance(item, dict):
            entries.append({"prompt": item["prompt"], "max_tokens": item.get("max_tokens")})
        else:
            entries.append({"prompt": item, "max_tokens": None})
    if not entries:
        raise ValueError(f"{path}: no prompts")
    return entries


# --------------------------------------------------------------------------- run-wide record

class Recorder:
    """Raw samples for exact percentiles; locust's own stats round response times into buckets, which
    makes millisecond-scale inter-token latencies useless at the percentiles that matter."""

    METRICS = ("TTFT", "ITL", "TPOT", "E2E", "OUTPUT_TOKENS")

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.samples: dict[str, list[float]] = {m: [] for m in self.METRICS}
        self.ok = 0
        self.rejections: Counter = Counter()
        self.failures: Counter = Counter()
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.late_arrivals = 0

    def span(self, start: float, end: float):
        with self.lock:
            self.first_start = start if self.first_start is None else min(self.first_start, start)
            self.last_end = end if self.last_end is None else max(self.last_end, end)

    def summary(self) -> dict:
        with self.lock:
            duration = (self.last_end - self.first_start) if self.first_start is not None else 0.0
            out: dict[str, Any] = {
                "duration_s": round(duration, 3),
                "requests_ok": self.ok,
                "rejections": dict(self.rejections),
                "failures": dict(self.failures),
                "requests_rejected": sum(self.rejections.values()),
                "requests_failed": sum(self.failures.values()),
                "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens,
                "late_arrivals": self.late_arrivals,
                "req_per_s": round(self.ok / duration, 3) if duration > 0 else 0.0,
                "output_tok_per_s": round(self.output_tokens / duration, 3) if duration > 0 else 0.0,
            }
            for metric, values in self.samples.items():
                out[metric.lower()] = describe(values, unit="tokens" if metric == "OUTPUT_TOKENS" else "ms")
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def describe(values: list[float], unit: str) -> dict:
    if not values:
        return {"count": 0, "unit": unit}
    s = sorted(values)
    r = (lambda x: round(x, 3))
    return {"count": len(s), "unit": unit, "mean": r(sum(s) / len(s)), "min": r(s[0]), "max": r(s[-1]),
            "p50": r(percentile(s, 0.5)), "p90": r(percentile(s, 0.9)), "p99": r(percentile(s, 0.99))}


RECORD = Recorder()


@events.test_start.add_listener
def _on_test_start(environment, **_kw):
    RECORD.reset()


@events.quitting.add_listener
def _on_quitting(environment, **_kw):
    options = environment.parsed_options
    path = getattr(options, "summary_json", "") if options else ""
    if not path:
        return
    summary = RECORD.summary()
    summary["options"] = {k: getattr(options, k) for k in (
        "endpoint", "stream", "model", "prompt_tokens", "output_tokens", "prompt_file", "prompt_format",
        "arrival", "rate", "num_users", "spawn_rate", "run_time", "host")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- the user

class RequestError(Exception):
    """A failed request; the message is the error kind that reports group by."""


class OpenAIUser(User):
    # Overridden by --host / -H.
    host = "http://127.0.0.1:8000"
    _ids = iter(range(1 << 30))
    _model_lock = threading.Lock()
    _model_name: str | None = None
    _prompts: list[dict] | None = None

    def __init__(self, environment):
        super().__init__(environment)
        o = environment.parsed_options
        self.o = o
        self.index = next(self._ids)
        self.rng = random.Random((o.seed if o else 0) + self.index)
        self.prompt_len = LengthDist(o.prompt_tokens)
        self.output_len = LengthDist(o.output_tokens)
        if o.prompt_file and OpenAIUser._prompts is None:
            OpenAIUser._prompts = load_prompt_file(o.prompt_file)
        if (self.prompt_len.kind == "file" or self.output_len.kind == "file") and not o.prompt_file:
            raise ValueError("`file` lengths need --prompt-file")
        headers = {"Content-Type": "application/json"}
        key = o.api_key or os.environ.get("OPENAI_API_KEY", "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # One connection per user, kept alive: connection setup is not what is being measured.
        self.http = httpx.Client(base_url=self.host.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(o.request_timeout, connect=30.0))
        self.sent = 0
        self.next_arrival: float | None = None
        self.label = o.endpoint + (" stream" if o.stream else "")

    def on_stop(self):
        self.http.close()

    # Pacing. With `rate` R shared by U users each user runs its own process of rate R/U; the
    # superposition of U Poisson processes of rate R/U is a Poisson process of rate R, and U evenly
    # spaced ones (staggered by their random start) average R. A user busy past its next arrival sends
    # at once and the miss is counted (late_arrivals): add users when that number is not small.
    def wait_time(self) -> float:
        o = self.o
        if o.arrival == "closed" or o.rate <= 0:
            return o.think_time
        users = max(getattr(o, "num_users", None) or 1, 1)
        mean_gap = users / o.rate
        now = time.monotonic()
        if self.next_arrival is None:
            self.next_arrival = now + self.rng.uniform(0, mean_gap)
        gap = mean_gap if o.arrival == "constant" else self.rng.expovariate(1.0 / mean_gap)
        wait = self.next_arrival - now
        if wait < 0:
            with RECORD.lock:
                RECORD.late_arrivals += 1
            # Do not fire a backlog of arrivals in a burst after a slow request.
            self.next_arrival = now
            wait = 0.0
        self.next_arrival += gap
        return wait

    def on_start(self):
        if self.o.arrival != "closed" and self.o.rate > 0:
            self._sleep(self.wait_time())

    def _sleep(self, seconds: float):
        if seconds > 0:
            import gevent
            gevent.sleep(seconds)

    # ---- request building

    def model(self) -> str:
        if self.o.model:
            return self.o.model
        with OpenAIUser._model_lock:
            if OpenAIUser._model_name is None:
                r = self.http.get("/v1/models", timeout=30)
                r.raise_for_status()
                OpenAIUser._model_name = r.json()["data"][0]["id"]
        return OpenAIUser._model_name

    def make_prompt(self) -> tuple[Any, int]:
        """(prompt, max_tokens)."""
        o, rng = self.o, self.rng
        from_file_max = None
        if OpenAIUser._prompts:
            entry = rng.choice(OpenAIUser._prompts)
            prompt = entry["prompt"]
            from_file_max = entry["max_tokens"]
            if self.prompt_len.kind != "file":
                prompt = _resize(prompt, self.prompt_len.sample(rng), rng, o.vocab_size)
        else:
            n = self.prompt_len.sample(rng)
            if o.endpoint == "completions" and o.prompt_format == "ids":
                prompt = [rng.randrange(3, o.vocab_size) for _ in range(n)]
            else:
                prompt = " ".join(rng.choice(_WORDS) for _ in range(n))
        if o.endpoint == "chat" and not isinstance(prompt, str):
            raise ValueError("chat needs text prompts; use --endpoint completions for token ids")
        return prompt, self.output_len.sample(rng, from_file_max)

    def body(self, prompt: Any, max_tokens: int) -> dict:
        o = self.o
        body: dict[str, Any] = {"model": self.model(), "max_tokens": max_tokens, "temperature": o.temperature}
        if o.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if o.ignore_eos:
            body["ignore_eos"] = True
        if o.return_token_ids:
            body["return_token_ids"] = True
        if o.stream:
            body["stream"] = True
            if o.include_usage:
                body["stream_options"] = {"include_usage": True}
        return body

    # ---- the request

    @task
    def one_request(self):
        if self.o.requests_per_user and self.sent >= self.o.requests_per_user:
            raise StopUser()
        self.sent += 1
        prompt, max_tokens = self.make_prompt()
        body = self.body(prompt, max_tokens)
        path = "/v1/chat/completions" if self.o.endpoint == "chat" else "/v1/completions"
        start_wall = time.time()
        start = time.perf_counter()
        try:
            if self.o.stream:
                result = self._streamed(path, body, start)
            else:
                result = self._plain(path, body)
        except _Rejected as rej:
            elapsed = (time.perf_counter() - start) * 1000
            with RECORD.lock:
                RECORD.rejections[str(rej.status)] += 1
            self.fire("REJECTED", str(rej.status), elapsed, 0)
            RECORD.span(start_wall, time.time())
            return
        except RequestError as exc:
            self._fail(start, start_wall, str(exc), exc)
            return
        except httpx.TimeoutException as exc:
            self._fail(start, start_wall, "timeout", RequestError(f"timeout: {type(exc).__name__}"))
            return
        except (httpx.HTTPError, OSError, ValueError) as exc:
            kind = f"transport: {type(exc).__name__}"
            self._fail(start, start_wall, kind, RequestError(kind))
            return
        end = time.perf_counter()
        e2e = (end - start) * 1000
        out_tokens, prompt_tokens, ttft, itls = result
        self.fire("POST", self.label, e2e, out_tokens)
        self.fire("E2E", self.label, e2e, out_tokens)
        self.fire("OUTPUT_TOKENS", self.label, out_tokens, out_tokens)
        tpot = None
        if ttft is not None:
            self.fire("TTFT", self.label, ttft, 0)
            for gap in itls:
                self.fire("ITL", self.label, gap, 0)
            if out_tokens > 1:
                tpot = (e2e - ttft) / (out_tokens - 1)
        elif out_tokens > 0:
            tpot = e2e / out_tokens
        if tpot is not None:
            self.fire("TPOT", self.label, tpot, 0)
        with RECORD.lock:
            RECORD.ok += 1
            RECORD.output_tokens += out_tokens
            RECORD.prompt_tokens += prompt_tokens
            s = RECORD.samples
            s["E2E"].append(e2e)
            s["OUTPUT_TOKENS"].append(out_tokens)
            if ttft is not None:
                s["TTFT"].append(ttft)
                s["ITL"].extend(itls)
            if tpot is not None:
                s["TPOT"].append(tpot)
        RECORD.span(start_wall, time.time())

    def fire(self, request_type: str, name: str, response_time: float, length: int, exception=None):
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=response_time,
                                             response_length=length, exception=exception, context={})

    def _fail(self, start: float, start_wall: float, kind: str, exc: Exception):
        elapsed = (time.perf_counter() - start) * 1000
        with RECORD.lock:
            RECORD.failures[kind] += 1
        self.fire("POST", self.label, elapsed, 0, exception=exc)
        RECORD.span(start_wall, time.time())

    def _plain(self, path: str, body: dict):
        r = self.http.post(path, json=body)
        _check_status(r.status_code, r)
        try:
            data = r.json()
            usage = data.get("usage") or {}
            out = usage.get("completion_tokens")
            if out is None:
                out = sum(_choice_tokens(c, chat=self.o.endpoint == "chat") for c in data["choices"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RequestError(f"bad response: {type(exc).__name__}") from None
        return int(out), int(usage.get("prompt_tokens") or 0), None, []

    def _streamed(self, path: str, body: dict, start: float):
        chat = self.o.endpoint == "chat"
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                r.read()
                _check_status(r.status_code, r)
            first: float | None = None
            last = start
            gaps: list[float] = []
            counted = 0
            usage: dict = {}
            done = False
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    raise RequestError("bad stream event") from None
                if "error" in event:
                    err = event["error"] or {}
                    raise RequestError(f"stream error: {err.get('type') or err.get('code') or 'unknown'}")
                if event.get("usage"):
                    usage = event["usage"]
                k = sum(_choice_tokens(c, chat=chat) for c in event.get("choices") or [])
                if k <= 0:
                    continue
                if first is None:
                    first = now
                    # Extra tokens of the first chunk arrived together with the first token.
                    gaps.extend([0.0] * (k - 1))
                else:
                    gaps.extend([(now - last) * 1000 / k] * k)
                last = now
                counted += k
            if not done:
                raise RequestError("stream ended without [DONE]")
        out = int(usage.get("completion_tokens") or counted)
        ttft = (first - start) * 1000 if first is not None else None
        return out, int(usage.get("prompt_tokens") or 0), ttft, gaps


class _Rejected(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _check_status(status: int, response: httpx.Response):
    if 200 <= status < 300:
        return
    if status in REJECTION_STATUSES:
        raise _Rejected(status)
    code = None
    try:
        err = response.json().get("error") or {}
        code = err.get("code") or err.get("type")
    except (ValueError, AttributeError):
        pass
    raise RequestError(f"HTTP {status}" + (f" {code}" if code else ""))


def _choice_tokens(choice: dict, chat: bool) -> int:
    """Tokens a choice (or a stream chunk's choice) carries. Token ids are exact; without them a
    non-empty text piece counts as one token, which is what a server with no tokenizer cannot give."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    if chat:
        text = (choice.get("delta") or choice.get("message") or {}).get("content")
    else:
        text = choice.get("text")
    return 1 if text else 0


def _resize(prompt: Any, n: int, rng: random.Random, vocab: int) -> Any:
    """A file prompt cut or padded to n tokens (ids) or about n words (text)."""
    if isinstance(prompt, list):
        return (prompt + [rng.randrange(3, vocab) for _ in range(max(0, n - len(prompt)))])[:n]
    words = str(prompt).split()
    while len(words) < n:
        words += words or [rng.choice(_WORDS)]
    return " ".join(words[:n])
