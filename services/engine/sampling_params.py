"""Per-request sampling and stopping options, validated once at construction.

Semantics follow the OpenAI API and vLLM so clients and dashboards carry over unchanged:
penalties act on generated tokens (presence, frequency) or on prompt and generated tokens
(repetition), `logprobs=N` returns the sampled token's logprob plus the N most likely alternatives;
`prompt_logprobs=N` does the same for every prompt token but the first (vLLM's field; OpenAI's
completions `echo` + `logprobs` is built on it). `structured_output` constrains the output to a JSON
schema, regex, choice list or grammar (services/engine/structured_output.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from services.engine.api import MAX_LOGPROBS, Rejection, RequestRejected
from services.engine.structured_output import StructuredOutput

# Below this a temperature is treated as greedy: dividing logits by it would only amplify noise.
GREEDY_TEMPERATURE = 1e-5
MAX_N = 16
# OpenAI's range: a bias of -100 or 100 in practice bans or forces a token.
MAX_LOGIT_BIAS = 100.0
# A priority fits a signed 32-bit integer (the range protobuf and most clients use).
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True/False as a count or token id is always a client mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _reject(name: str, allowed: str, value: object) -> NoReturn:
    # Rejected for a wrong type too: either way the client sent a bad field (HTTP 400).
    raise RequestRejected(Rejection(f"{name} must be {allowed}, got {value!r}", param=name))


def _check_number(name: str, value: object, allowed: str, ok: Callable[[float], bool]) -> None:
    if not _is_number(value) or not ok(value):
        _reject(name, f"a finite number in {allowed}", value)


def _check_int(name: str, value: object, allowed: str, ok: Callable[[int], bool]) -> None:
    if not _is_int(value) or not ok(value):
        _reject(name, f"an integer in {allowed}", value)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        _reject(name, "a bool", value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one request.

    max_tokens=None generates until a stop condition or the model's context length.
    A temperature below GREEDY_TEMPERATURE (in particular 0) selects the argmax token.
    `stop` accepts a single string or a list/tuple of strings and is stored as a tuple;
    `stop_token_ids` likewise becomes a tuple of ints. `logit_bias` (a mapping of token id to a bias in
    [-100, 100], added to that token's logit before sampling) is stored as sorted (id, bias) pairs; ids
    are checked against the vocabulary where the request is admitted. `priority` orders admission
    (lower first, vLLM's convention); it is the scheduler's, not the sampler's, but travels here so
    that every engine client carries it unchanged.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    priority: int = 0
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, f"[1, {MAX_N}]", lambda v: 1 <= v <= MAX_N)
        _check_number("temperature", self.temperature, "[0, inf)", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "(0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, "{-1, 0} (disabled) or [1, inf)", lambda v: v >= -1)
        _check_number("min_p", self.min_p, "[0, 1]", lambda v: 0 <= v <= 1)
        if self.seed is not None:
            # torch generators accept exactly this range.
            _check_int("seed", self.seed, "[-2**63, 2**64)", lambda v: -(2**63) <= v < 2**64)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), "[-2, 2]", lambda v: -2 <= v <= 2)
        _check_number("repetition_penalty", self.repetition_penalty, "(0, inf)", lambda v: v > 0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, "[1, inf) or None", lambda v: v >= 1)
        upper = "inf" if self.max_tokens is None else f"max_tokens={self.max_tokens}"
        _check_int("min_tokens", self.min_tokens, f"[0, {upper}]",
                   lambda v: v >= 0 and (self.max_tokens is None or v <= self.max_tokens))
        self._normalise_stop()
        self._normalise_stop_token_ids()
        _check_bool("ignore_eos", self.ignore_eos)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), f"[0, {MAX_LOGPROBS}] or None",
                           lambda v: 0 <= v <= MAX_LOGPROBS)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        self._normalise_logit_bias()
        low, high = PRIORITY_RANGE
        _check_int("priority", self.priority, f"[{low}, {high}]", lambda v: low <= v <= high)
        self._check_structured_output()

    def _check_structured_output(self) -> None:
        constraint = self.structured_output
        if constraint is None:
            return
        if not isinstance(constraint, StructuredOutput):
            _reject("structured_output", "a StructuredOutput or None", constraint)
        if self.min_tokens:
            # The grammar decides where the output ends; holding back eos could leave no token allowed.
            raise RequestRejected(Rejection(
                f"min_tokens cannot be combined with {constraint.param}: the constraint decides where "
                f"the output ends", param="min_tokens"))

    def _normalise_stop(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            _reject("stop", "a string or a list of strings", stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                _reject("stop", "a list of non-empty strings; an element", s)
        object.__setattr__(self, "stop", tuple(stop))

    def _normalise_stop_token_ids(self) -> None:
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            _reject("stop_token_ids", "a list of integers >= 0", ids)
        for t in ids:
            _check_int("stop_token_ids", t, "[0, inf) (each element)", lambda v: v >= 0)
        object.__setattr__(self, "stop_token_ids", tuple(ids))

    def _normalise_logit_bias(self) -> None:
        bias = self.logit_bias
        pairs = tuple(bias.items()) if isinstance(bias, Mapping) else bias
        if not isinstance(pairs, (list, tuple)):
            _reject("logit_bias", "a mapping of token id to bias", bias)
        normalised = {}
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                _reject("logit_bias", "a mapping of token id to bias; an entry", pair)
            token, value = pair
            _check_int("logit_bias", token, "[0, inf) (each token id)", lambda v: v >= 0)
            _check_number("logit_bias", value, f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] (each bias)",
                          lambda v: -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS)
            normalised[token] = float(value)
        object.__setattr__(self, "logit_bias", tuple(sorted(normalised.items())))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def uses_top_k(self) -> bool:
        return self.top_k >= 1

    def seed_for(self, index: int) -> int | None:
        """The seed of the index-th of the n sequences: distinct per sequence, fixed per request."""
        return None if self.seed is None else self.seed + index
