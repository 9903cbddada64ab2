"""The OpenAI-compatible wire format: pydantic request and response models.

Requests are validated strictly for types ("5" is not an integer, true is not a number) so a client
mistake is a 400 that names the field; value ranges are checked once, by `SamplingParams`. Unknown
fields are ignored, as OpenAI clients send fields that do not apply here (`store`, `metadata`).
Extensions beyond OpenAI follow vLLM's names: top_k, min_p, repetition_penalty, min_tokens,
stop_token_ids, ignore_eos, skip_special_tokens, `return_token_ids` (each choice then carries the
generated `token_ids`, since text does not map back to ids one to one) and `prompt_logprobs` (per prompt
token, None for the first: `{token id: {logprob, rank, decoded_token}}` for the prompt token and the N
most likely ones, on each completions choice and on the chat response). Structured outputs take OpenAI's
`response_format` and vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and
`structured_outputs` (services/gateway/structured_outputs.py); tools follow OpenAI's shape
(services/gateway/tool_calls.py).
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.engine.api import Rejection, RequestRejected
from services.engine.sampling_params import SamplingParams
from services.engine.structured_output import StructuredOutput

_OMIT_NONE = {"exclude_if": lambda value: value is None}
# logit_bias keys: token ids as OpenAI writes them, decimal digits only (no sign, space or exponent).
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,12}")


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    # "schema" would shadow a BaseModel attribute.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Request):
    """vLLM's `structured_outputs` request field (its newer spelling of the guided_* fields)."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(_Request):
    """Fields chat and completions share."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsField | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, extra_stop: tuple[str, ...] = (),
                        prompt_logprobs: int | None = None,
                        structured_output: StructuredOutput | None = None) -> SamplingParams:
        """Raises RequestRejected naming the engine parameter (services/engine/api.py)."""
        stop = self.stop if self.stop is not None else ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "min_tokens") if getattr(self, name) is not None}
        return SamplingParams(
            n=self.n, seed=self.seed, max_tokens=max_tokens, stop=(*stop, *extra_stop),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            logit_bias=self._logit_bias(), priority=self.priority,
            structured_output=structured_output, **given)

    def _logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise RequestRejected(Rejection(
                    f"logit_bias keys must be token ids written in decimal digits, got {key!r}", "logit_bias"))
            bias[int(key)] = value
        return bias

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message that carries tool_calls (the template says so otherwise).
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role}
        if self.content is not None:
            message["content"] = (self.content if isinstance(self.content, str)
                                  else [p.model_dump() for p in self.content])
        elif self.tool_calls and role == "assistant":
            message["content"] = ""
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_bos: bool = False
    add_special_tokens: bool | None = None  # vLLM's name for add_bos; either adds it


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# --- responses -------------------------------------------------------------------------------------

class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptTokenLogprob(_Response):
    logprob: float
    rank: int | None = None
    decoded_token: str


# vLLM's shape: one entry per prompt token (None for the first), keyed by token id.
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(default=None, **_OMIT_NONE)
    token_ids: list[int] | None = Field(default=None, **_OMIT_NONE)
    prompt_token_ids: list[int] | None = Field(default=None, **_OMIT_NONE)
    prompt_logprobs: PromptLogprobs | None = Field(default=None, **_OMIT_NONE)


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(default=None, **_OMIT_NONE)
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(default=None, **_OMIT_NONE)
    token_ids: list[int] | None = Field(default=None, **_OMIT_NONE)


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(default=None, **_OMIT_NONE)


class DeltaFunctionCall(_Response):
    name: str | None = Field(default=None, **_OMIT_NONE)
    arguments: str | None = Field(default=None, **_OMIT_NONE)


class DeltaToolCall(_Response):
    index: int
    id: str | None = Field(default=None, **_OMIT_NONE)
    type: Literal["function"] | None = Field(default=None, **_OMIT_NONE)
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    role: str | None = Field(default=None, **_OMIT_NONE)
    content: str | None = Field(default=None, **_OMIT_NONE)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, **_OMIT_NONE)


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(default=None, **_OMIT_NONE)


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = Field(default=None, **_OMIT_NONE)


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "grok-serve"
    root: str
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


class TokenizerInfoResponse(_Response):
    """vLLM's /tokenizer_info: enough for a client to tokenize as the server does (lm-evaluation-harness's
    remote tokenizer reads the special tokens from it, then calls /tokenize and /detokenize)."""

    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    chat_template: str


class VersionResponse(_Response):
    version: str


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class HealthResponse(_Response):
    status: Literal["ok"] = "ok"


# --- from engine outputs to the wire ---------------------------------------------------------------

# JSON has no -inf: a token the sampler could never pick gets this instead (what vLLM reports too).
_MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if not math.isnan(logprob) and logprob > _MIN_LOGPROB else _MIN_LOGPROB


def token_surface(tokenizer: Any, token_id: int) -> tuple[str, bytes]:
    """A token's text as OpenAI shows it in logprobs (partial UTF-8 as U+FFFD) and its raw bytes."""
    data = tokenizer.token_bytes(token_id, skip_special=False)
    return data.decode("utf-8", errors="replace"), data


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]] | None) -> list[ChatTokenLogprob]:
    out = []
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
        text, data = token_surface(tokenizer, token_id)
        alternatives = []
        for alt_id, alt_logprob in (top[i] if top and i < len(top) else []):
            alt_text, alt_data = token_surface(tokenizer, alt_id)
            alternatives.append(TopLogprob(token=alt_text, logprob=_finite(alt_logprob), bytes=list(alt_data)))
        out.append(ChatTokenLogprob(token=text, logprob=_finite(logprob), bytes=list(data),
                                    top_logprobs=alternatives))
    return out


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[float | None],
                        top: list[list[tuple[int, float]] | None] | None, offset: int) -> CompletionLogprobs:
    """The legacy shape; `text_offset` counts characters of the tokens' own surfaces from `offset`.
    A None logprob (the first prompt token under echo) has no alternatives either."""
    result = CompletionLogprobs()
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
        text, _ = token_surface(tokenizer, token_id)
        if logprob is None:
            result.tokens.append(text)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            result.text_offset.append(offset)
            offset += len(text)
            continue
        alternatives: dict[str, float] = {}
        for alt_id, alt_logprob in (top[i] if top and i < len(top) else []):
            # Distinct ids may share a surface; the likelier (listed first) keeps it.
            alternatives.setdefault(token_surface(tokenizer, alt_id)[0], _finite(alt_logprob))
        result.tokens.append(text)
        result.token_logprobs.append(_finite(logprob))
        result.top_logprobs.append(alternatives)
        result.text_offset.append(offset)
        offset += len(text)
    return result


def echo_logprobs(tokenizer: Any, prompt_ids: list[int], entries: list[Any], top_n: int) -> CompletionLogprobs:
    """The prompt part of completions `echo` + `logprobs`: engine PromptLogprob entries (None first)."""
    return completion_logprobs(tokenizer, prompt_ids, [None if e is None else e.logprob for e in entries],
                               [None if e is None else e.top[:top_n] for e in entries], 0)


def prompt_logprobs(tokenizer: Any, prompt_ids: list[int], entries: list[Any] | None) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs` from engine PromptLogprob entries (None first)."""
    if entries is None:
        return None
    result: PromptLogprobs = []
    for token_id, entry in zip(prompt_ids, entries):
        if entry is None:
            result.append(None)
            continue
        ranked = {token_id: (entry.logprob, entry.rank)}
        for rank, (alt_id, alt_logprob) in enumerate(entry.top, start=1):
            ranked.setdefault(alt_id, (alt_logprob, rank))
        result.append({str(t): PromptTokenLogprob(logprob=_finite(lp), rank=rank,
                                                  decoded_token=token_surface(tokenizer, t)[0])
                       for t, (lp, rank) in ranked.items()})
    return result


class Choice:
    """One sequence's whole answer, accumulated from its increments."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def add(self, out: Any) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.top_logprobs += out.top_logprobs or []
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
