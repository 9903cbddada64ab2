"""The engine contract: what the front ends (HTTP, gRPC) and the engine backends (the in-process
`AsyncEngine`, a Ray Serve handle, vLLM) agree on.

- `ModelInfo`: what a front end must know to admit a request without asking the engine.
- `StreamingEngineClient` / `EngineClient`: the engine as a front end calls it.
- The failures a client reports, told apart by type only: `RequestRejected` (this request can never
  be served: HTTP 400, gRPC INVALID_ARGUMENT), `QueueFullError` (not now: 429, RESOURCE_EXHAUSTED),
  `EngineDeadError` and `EngineUnavailableError` (503, UNAVAILABLE). Each boundary translates them once.
- `admit`: the one admission rule for a prompt and its token budget. It returns a `Rejection` (message,
  param, code) rather than raising, so a front end can name its own field in the error.
- `RequestLimits` / `check_limits`: the per-request caps on everything else a client can make the engine
  spend time or memory on (stop strings, sequences, logprobs, logit_bias, messages), checked by every
  front end before anything is tokenized or queued.

This module imports no torch, FastAPI or gRPC: a gateway replica loads it and nothing heavier.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from services.config_checks import ConfigError, positive_int

if TYPE_CHECKING:  # the types the clients exchange; they import this module for RequestRejected
    from services.engine.outputs import RequestOutput
    from services.engine.sampling_params import SamplingParams
    from services.model.tokenizer import Tokenizer

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
LIMIT_EXCEEDED = "limit_exceeded"
# The most logprob alternatives SamplingParams accepts; a configured limit may only be stricter.
MAX_LOGPROBS = 20


# --- failures ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rejection:
    """Why a request cannot be served: `param` names the request field at fault (as the engine calls
    it; front ends may rename it), `code` is a stable machine-readable reason."""

    message: str
    param: str | None = None
    code: str | None = None


class RequestRejected(ValueError):
    """A request that can never be served as given; nothing was queued."""

    def __init__(self, rejection: Rejection):
        super().__init__(rejection.message)
        self.rejection = rejection

    def __reduce__(self):
        # Crosses process boundaries (Ray) with its structure intact.
        return type(self), (self.rejection,)

    @property
    def param(self) -> str | None:
        return self.rejection.param

    @property
    def code(self) -> str | None:
        return self.rejection.code


class QueueFullError(RuntimeError):
    """The engine cannot take another request now; the client should retry after `retry_after_s`."""

    def __init__(self, message: str = "the engine's request queue is full",
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (str(self), self.retry_after_s)


class EngineDeadError(RuntimeError):
    """The engine failed; in-flight and new requests fail with this until it is replaced."""


class EngineUnavailableError(EngineDeadError):
    """No engine replica can answer (dead, restarting, or not reachable in time)."""


# --- admission -----------------------------------------------------------------------------------
def check_token_ids(token_ids: Seq[int], vocab_size: int, param: str) -> Rejection | None:
    bad = next((t for t in token_ids if not 0 <= int(t) < vocab_size), None)
    if bad is None:
        return None
    return Rejection(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param)


def check_truncation(keep: int | None, max_model_len: int) -> Rejection | None:
    """vLLM's truncate_prompt_tokens (keep the prompt's last `keep` tokens) must lie in [1, max_model_len]."""
    if keep is None or 1 <= keep <= max_model_len:
        return None
    return Rejection(f"truncate_prompt_tokens must be in [1, {max_model_len}] (max_model_len), got {keep}",
                     "truncate_prompt_tokens")


def completion_budget(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The tokens a request may generate: `max_tokens`, or (None) the rest of the context."""
    return max_tokens if max_tokens is not None else max(1, max_model_len - num_prompt_tokens)


def admit(prompt_ids: Seq[int], max_tokens: int | None, *, vocab_size: int, max_model_len: int,
          param: str = "prompt") -> Rejection | None:
    """None when the prompt (`param` in the request) and `max_tokens` fit the model, else why not."""
    n = len(prompt_ids)
    if n == 0:
        return Rejection("the prompt is empty", param)
    out_of_vocabulary = check_token_ids(prompt_ids, vocab_size, param)
    if out_of_vocabulary is not None:
        return out_of_vocabulary
    wanted = completion_budget(n, max_tokens, max_model_len)
    if n + wanted <= max_model_len:
        return None
    return Rejection(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{n + wanted} tokens ({n} in the prompt, {wanted} for the completion). Please reduce the length "
        f"of the prompt or max_tokens.",
        param if n >= max_model_len else "max_tokens", CONTEXT_LENGTH_EXCEEDED)


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request, so that no single client can slow every other one down. Each is checked
    at admission, before anything is tokenized or queued; a request over one gets 400 naming it."""

    max_stop_strings: int = 64  # entries of `stop`
    max_stop_chars: int = 4096  # their total length, in characters
    # Sequences one request may start: prompts x n (a completions request takes a list of prompts).
    max_sequences: int = 64
    max_logprobs: int = 20  # logprobs / top_logprobs
    max_logit_bias: int = 300  # entries of logit_bias (OpenAI's own limit)
    max_messages: int = 1024  # chat messages
    # Characters of a structured-output constraint (JSON schema, regex, choices, grammar) or of the
    # tool definitions that become one: compilation time grows with it.
    max_structured_output_chars: int = 65536

    def __post_init__(self) -> None:
        for name in ("max_stop_strings", "max_stop_chars", "max_sequences", "max_logit_bias",
                     "max_messages", "max_structured_output_chars"):
            positive_int("limits", name, getattr(self, name))
        value = self.max_logprobs
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
            raise ConfigError(f"limits.max_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")


def _over(param: str, what: str, count: int, limit: int, name: str) -> Rejection:
    return Rejection(f"{param}: {what} {count}, over the limit of {limit} (limits.{name})", param,
                     LIMIT_EXCEEDED)


def check_limits(limits: RequestLimits, *, stop: Seq[str] = (), num_prompts: int = 1, n: int = 1,
                 logprobs: int | None = None, logit_bias: int = 0, messages: int = 0,
                 structured_output: tuple[str, int] | None = None,
                 names: dict[str, str] | None = None) -> Rejection | None:
    """None when the request is within `limits`, else the first limit it exceeds. Only counts are
    looked at, so this is cheap even for a request built to be expensive. `names` maps the parameters
    checked (stop, n, prompt, logprobs, logit_bias, messages) to the request's own field names.
    `structured_output` is (the field that carries it, its size in characters)."""
    names = names or {}
    stop_param = names.get("stop", "stop")
    if len(stop) > limits.max_stop_strings:
        return _over(stop_param, "the number of stop strings is", len(stop), limits.max_stop_strings,
                     "max_stop_strings")
    chars = sum(len(s) for s in stop)
    if chars > limits.max_stop_chars:
        return _over(stop_param, "the stop strings' total length is", chars, limits.max_stop_chars,
                     "max_stop_chars")
    if num_prompts * n > limits.max_sequences:
        param = names.get("n", "n") if num_prompts == 1 else names.get("prompt", "prompt")
        return _over(param, f"{num_prompts} prompt(s) x n={n} sequences is", num_prompts * n,
                     limits.max_sequences, "max_sequences")
    if logprobs is not None and logprobs > limits.max_logprobs:
        return _over(names.get("logprobs", "logprobs"), "asks for", logprobs, limits.max_logprobs,
                     "max_logprobs")
    if logit_bias > limits.max_logit_bias:
        return _over(names.get("logit_bias", "logit_bias"), "the number of entries is", logit_bias,
                     limits.max_logit_bias, "max_logit_bias")
    if messages > limits.max_messages:
        return _over(names.get("messages", "messages"), "the number of messages is", messages,
                     limits.max_messages, "max_messages")
    if structured_output is not None and structured_output[1] > limits.max_structured_output_chars:
        return _over(structured_output[0], "the constraint's length in characters is", structured_output[1],
                     limits.max_structured_output_chars, "max_structured_output_chars")
    return None


# --- the clients ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What a front end must know about the model to admit requests without asking the engine."""

    source: str  # the preset name or checkpoint directory the engine loaded
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_experts: int
    created: int  # when the engine started, in Unix seconds (the OpenAI model card's `created`)


@runtime_checkable
class StreamingEngineClient(Protocol):
    """What the gRPC front end needs from an engine, wherever it runs (EngineClient adds the rest the
    HTTP front end uses).

    `generate` yields the request's `RequestOutput` increments, the last with `finished`; closing the
    iterator early should abort the request, and `abort` must as well (and ignore unknown ids: a front
    end may abort a request that already finished). Failures are the types above: `RequestRejected`
    (or another ValueError) for a request that cannot be served, `QueueFullError` when it cannot be
    taken now, `EngineDeadError` when the engine is gone. `is_healthy` is read on every health check,
    so it must be cheap, and kept current by the client: requests are still attempted while it is
    False (the engine client, not a cached flag, decides that the engine is gone). The attributes
    may be read-only properties.
    """

    tokenizer: Tokenizer
    max_model_len: int
    is_healthy: bool

    def generate(self, prompt_ids: Seq[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...


@runtime_checkable
class EngineClient(StreamingEngineClient, Protocol):
    """The engine as the front ends see it: in this process (services.engine.async_engine
    .LocalEngineClient), behind a Ray Serve handle (services.serve_app.ServeEngineClient) or vLLM's
    engine (services.vllm_plugin.engine_client.VllmEngineClient)."""

    model_info: ModelInfo

    async def check_health(self) -> None:
        """Raise `EngineDeadError` when the engine cannot serve."""

    async def metrics_snapshot(self) -> dict[str, Any]:
        """The engine's numbers as plain data, for services.gateway.metrics.GatewayMetrics.fold:
        `replica`, `time`, `counters` (cumulative), `finished` (sequences by finish reason), `gauges`
        (current), `samples` (per histogram: cumulative bucket counts, `{"bounds", "counts", "sum"}`
        as services/engine/histogram.py keeps them, or a list of the observations made since the last
        snapshot, handed out once) and, where the engine has them, `expert_tokens` [layer][expert] and
        `rank_expert_tokens` [rank]. A gauge the engine does not measure is left out, not set to 0."""
