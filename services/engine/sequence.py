"""The state of one generated sequence, from arrival to finish. Plain Python, no torch.

A request with n > 1 becomes n sequences sharing a request id (index 0..n-1).
Token bookkeeping: `token_ids` = prompt + outputs; `num_computed_tokens` of them have their K/V in
the cache. A step computes tokens [num_computed_tokens, num_computed_tokens + chunk); when that
reaches `num_tokens`, the step's last logits give the next token. While decoding,
num_computed_tokens == num_tokens - 1: the newest sampled token is fed back next step.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass

from services.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Waiting again after its blocks were taken back; it recomputes prompt + outputs on resume.
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASON

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)

    @classmethod
    def finished(cls, reason: str) -> SequenceStatus:
        for status, name in _FINISH_REASON.items():
            if name == reason:
                return status
        raise ValueError(f"finish reason must be one of {sorted(_FINISH_REASON.values())}, got {reason!r}")


_FINISH_REASON = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}

# One generated token's top alternatives: (token id, logprob), most likely first.
TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token's logprob given the tokens before it, its rank (1 = the most likely) and the
    `prompt_logprobs` most likely tokens at its position."""

    logprob: float
    rank: int
    top: TopLogprobs


class Sequence:
    """Mutable state of one sequence. The scheduler and block manager own the bookkeeping fields;
    treat `token_ids`, `output_token_ids` and `block_table` as read-only elsewhere."""

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: Iterable[int],
                 sampling_params: SamplingParams | None = None, *, index: int = 0,
                 eos_token_id: int | None = None, arrival_time: float | None = None) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.eos_token_id = eos_token_id
        self.prompt_token_ids: tuple[int, ...] = tuple(prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {seq_id} (request {request_id!r}) has an empty prompt")
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.status = SequenceStatus.WAITING

        # Cache bookkeeping.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chain hashes of the full blocks of token_ids seen so far; token ids of a full block never
        # change, so these stay valid across preemption.
        self.block_hashes: list[int] = []
        # Prompt tokens found in the prefix cache at the first admission (OpenAI `cached_tokens`).
        self.num_cached_tokens = 0
        self.num_preemptions = 0

        # Admission order (services/engine/scheduler.py): lower priority first; counting the later
        # arrivals admitted ahead of this sequence bounds how long it can be passed over.
        self.priority = self.sampling_params.priority
        self.num_overtaken = 0

        # Statistics (seconds, on the engine's clock).
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None

        self.finish_reason: str | None = None
        # What stopped it: the stop token id or stop string; None for eos, length and abort.
        self.stop_reason: int | str | None = None

        # Filled only when sampling_params.logprobs is not None, one entry per output token.
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[TopLogprobs] = []
        # Filled only when sampling_params.prompt_logprobs is not None: prompt tokens 1.. in order
        # (the first token has no context to be predicted from).
        self.prompt_logprobs: list[PromptLogprob] = []
        # The structured-output matcher (an llguidance LLMatcher, advanced by each output token), or
        # None for an unconstrained sequence.
        self.grammar = None

    # --- token views -------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Every known token but the newest sampled one is in the cache: one token per step."""
        return self.num_output_tokens > 0 and self.num_computed_tokens == self.num_tokens - 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs and some are still to be computed (a resume after preemption
        that recomputes the prompt does not need them again)."""
        return (self.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def seed(self) -> int | None:
        return self.sampling_params.seed_for(self.index)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    # --- mutation (scheduler) ----------------------------------------------------------------
    def append_token(self, token_id: int, logprob: float | None = None,
                     top_logprobs: TopLogprobs | None = None) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.cumulative_logprob += logprob
            self.output_logprobs.append(logprob)
            self.output_top_logprobs.append(list(top_logprobs or ()))

    def set_finished(self, reason: str, now: float, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.finished(reason)
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_time = now

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
