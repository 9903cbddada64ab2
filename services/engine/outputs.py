"""What the engine hands back: per-step increments of each request's sequences, and usage."""
from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.sequence import PromptLogprob, TopLogprobs


@dataclass
class CompletionOutput:
    """One sequence of a request (index < n). `token_ids`, `text`, `logprobs` and `top_logprobs` are
    the increment of this step; `finish_reason` is set on the sequence's last increment."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or string that ended it


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    usage: Usage
    metrics: dict[str, float] = field(default_factory=dict)  # queue, ttft, e2e seconds when known
    # Once, on the first output after they are known, when the request asked for prompt_logprobs:
    # one entry per prompt token, None for the first.
    prompt_logprobs: list[PromptLogprob | None] | None = None
