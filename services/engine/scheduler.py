"""Continuous batching: which tokens of which sequences one forward step computes. No torch.

Each step, under a token budget (max_num_batched_tokens) and a cap on live sequences (max_num_seqs):
  1. decodes: running sequences feeding back their newest sampled token, one token each, oldest
     first. When a decode needs a block and none is free, the youngest running sequence is preempted
     (blocks freed, computed tokens reset, put back at the FRONT of the waiting queue; its outputs
     are kept and recomputed with the prompt on resume). It may be the decode itself.
  2. running sequences part-way through their prefill (or a post-preemption recompute) get the next
     chunk, oldest first.
  3. waiting sequences are admitted in rank order while the budget, max_num_seqs and free blocks
     allow; the first one that does not fit stops admission (nothing ranked below overtakes it).
     Nothing is admitted in a step that preempted (the preempted sequence heads the queue and cannot
     fit again in that step anyway; the rule keeps it so if allocation policies change).
Rank: preempted sequences first (they have made progress), then by `priority` (lower first, vLLM's
convention), then by age. Starvation bound: a waiting sequence is overtaken when one that arrived after
it is admitted first; once overtaken `max_overtakes` times it ranks with the preempted ones, by age, so
no later arrival is admitted before it again: at most `max_overtakes` later arrivals ever go first.
`max_overtakes=0` is strict FIFO; with equal priorities nothing is ever overtaken, so it is FIFO too.
Priority orders admission only: preemption still takes the youngest running sequence.
Prompts longer than the remaining budget are prefilled in chunks over several steps.
A sequence that asks for prompt logprobs is admitted without prefix-cache hits (cached tokens are not
computed, so their logits would be missing); once its prompt logprobs are all known, a resume after
preemption may hit the cache again.

Every "age" is (arrival_time, seq_id): "youngest" means the latest arrival.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from services.config_checks import positive_int
from services.engine.kv_cache import BlockManager
from services.engine.sequence import Sequence, SequenceStatus, TopLogprobs


def _age(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


def _rank(seq: Sequence, max_overtakes: int) -> tuple[int, int, float, int]:
    """Admission order: smallest first."""
    if seq.status is SequenceStatus.PREEMPTED or seq.num_overtaken >= max_overtakes:
        return (0, 0, *_age(seq))
    return (1, seq.priority, *_age(seq))


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192  # prompt + output tokens of one sequence
    # The starvation bound of priorities: later arrivals admitted ahead of a waiting sequence.
    max_overtakes: int = 32

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            positive_int("SchedulerConfig", name, getattr(self, name))
        if isinstance(self.max_overtakes, bool) or not isinstance(self.max_overtakes, int) \
                or self.max_overtakes < 0:
            raise ValueError(f"SchedulerConfig.max_overtakes must be an integer >= 0, got {self.max_overtakes!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise the running decodes alone could exceed the budget.
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs})")


@dataclass(frozen=True)
class ScheduledSequence:
    """Tokens [start, start + num_tokens) of `seq` are computed this step. Snapshots are taken at
    schedule time, so they stay valid if the sequence is aborted before the step is post-processed."""

    seq: Sequence
    start: int  # == seq.num_computed_tokens when scheduled
    num_tokens: int
    needs_sample: bool  # the chunk ends at the last known token: the runner samples the next one
    token_ids: tuple[int, ...]  # [num_tokens]
    block_table: tuple[int, ...]  # covers at least start + num_tokens tokens

    @property
    def seq_id(self) -> int:
        return self.seq.seq_id

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.num_tokens)

    @property
    def context_len(self) -> int:
        """Tokens of the sequence in the cache once this step has run."""
        return self.start + self.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """One step. `scheduled` lists decodes first (`num_decode` of them, one token each), then prefill
    chunks. The runner computes logits for the last token of each entry with needs_sample, in order
    (`sampled`), and hands the sampled ids back to `Scheduler.update` in that order."""

    scheduled: tuple[ScheduledSequence, ...]
    num_decode: int
    preempted_seq_ids: tuple[int, ...]
    # Finished or aborted since the previous step: per-sequence state elsewhere can be dropped.
    finished_seq_ids: tuple[int, ...]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled[self.num_decode:])

    @property
    def decodes(self) -> tuple[ScheduledSequence, ...]:
        return self.scheduled[:self.num_decode]

    @property
    def prefills(self) -> tuple[ScheduledSequence, ...]:
        return self.scheduled[self.num_decode:]

    @property
    def sampled(self) -> tuple[ScheduledSequence, ...]:
        return tuple(s for s in self.scheduled if s.needs_sample)

    def token_ids(self) -> list[int]:
        """[T] the step's input tokens, concatenated in `scheduled` order."""
        return [t for s in self.scheduled for t in s.token_ids]

    def positions(self) -> list[int]:
        """[T] the position of each input token within its sequence."""
        return [p for s in self.scheduled for p in s.positions]

    def sample_indices(self) -> list[int]:
        """Index into the [T] step tokens of the last token of each sampled entry."""
        indices, offset = [], 0
        for s in self.scheduled:
            offset += s.num_tokens
            if s.needs_sample:
                indices.append(offset - 1)
        return indices

    def prompt_logprob_rows(self) -> list[tuple[ScheduledSequence, int, int, int]]:
        """(entry, first step row, first prompt position q, count) for each entry whose rows give
        prompt logprobs: row q's logits predict prompt token q + 1. Only positions not yet recorded,
        so a recompute after preemption adds nothing twice."""
        rows, offset = [], 0
        for s in self.scheduled:
            seq = s.seq
            if seq.needs_prompt_logprobs:
                first = max(s.start, len(seq.prompt_logprobs))
                end = min(s.start + s.num_tokens, seq.num_prompt_tokens - 1)
                if end > first:
                    rows.append((s, offset + first - s.start, first, end - first))
            offset += s.num_tokens
        return rows

    def logits_indices(self) -> list[int]:
        """The step rows the runner computes logits for: `sample_indices()`, then the rows of
        `prompt_logprob_rows()` in order."""
        indices = self.sample_indices()
        for _, row, _, count in self.prompt_logprob_rows():
            indices.extend(range(row, row + count))
        return indices


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        capacity = block_manager.num_blocks * block_manager.block_size
        if config.max_model_len > capacity:
            # A lone sequence must always fit, or it could be preempted forever.
            raise ValueError(f"the KV cache holds {capacity} tokens, less than one sequence of "
                             f"max_model_len={config.max_model_len}")
        self.config = config
        self.block_manager = block_manager
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self._seqs: dict[int, Sequence] = {}
        self._requests: dict[str, set[int]] = {}
        self._finished_ids: list[int] = []
        self._in_flight: SchedulerOutput | None = None
        self.num_preemptions = 0

    # --- queue -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not a fresh waiting sequence")
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(f"sequence {seq.seq_id} has {seq.num_tokens} tokens: no room to generate "
                             f"within max_model_len={self.config.max_model_len}")
        self._seqs[seq.seq_id] = seq
        self._requests.setdefault(seq.request_id, set()).add(seq.seq_id)
        self.waiting.append(seq)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def request_seq_ids(self, request_id: str) -> frozenset[int]:
        return frozenset(self._requests.get(request_id, ()))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self._in_flight is not None:
            raise RuntimeError("schedule() called again before update() of the previous step")
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSequence] = []
        prefills: list[ScheduledSequence] = []
        preempted: list[int] = []

        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if not seq.is_decoding:
                i += 1
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                decodes.append(self._take(seq, 1))
                budget -= 1
                i += 1
                continue
            break  # seq preempted itself: it was the youngest, nothing is left after it

        for seq in self.running:
            if budget == 0:
                break
            if not seq.is_decoding:
                chunk = min(seq.num_uncomputed_tokens, budget)
                prefills.append(self._take(seq, chunk))
                budget -= chunk

        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = min(self.waiting, key=lambda s: _rank(s, self.config.max_overtakes))
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.remove(seq)
            for other in self.waiting:
                if _age(other) < _age(seq):
                    other.num_overtaken += 1
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_age)
            chunk = min(seq.num_uncomputed_tokens, budget)
            prefills.append(self._take(seq, chunk))
            budget -= chunk

        finished, self._finished_ids = tuple(self._finished_ids), []
        output = SchedulerOutput(tuple(decodes + prefills), len(decodes), tuple(preempted), finished)
        if not output.is_empty:
            self._in_flight = output
        return output

    def _take(self, seq: Sequence, num_tokens: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        end = start + num_tokens
        self.block_manager.commit(seq, end)
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = self.clock()
        return ScheduledSequence(seq, start, num_tokens, end == seq.num_tokens,
                                 tuple(seq.token_ids[start:end]), tuple(seq.block_table))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, output: SchedulerOutput, sampled_token_ids: Seq[int],
               logprobs: Seq[float | None] | None = None,
               top_logprobs: Seq[TopLogprobs | None] | None = None) -> list[Sequence]:
        """Post-process a step: advance computed tokens, append the sampled tokens (one per entry of
        `output.sampled`, in order) and finish sequences on eos, stop_token_ids, max_tokens or the
        context length. Returns the sequences finished here. Sequences finished or aborted while the
        step ran are skipped (their sampled token is dropped)."""
        if output is not self._in_flight:
            raise RuntimeError("update() must receive the output of the latest schedule()")
        num_sampled = sum(1 for s in output.scheduled if s.needs_sample)
        if len(sampled_token_ids) != num_sampled:
            raise ValueError(f"expected {num_sampled} sampled tokens, got {len(sampled_token_ids)}")
        self._in_flight = None
        now = self.clock()
        finished: list[Sequence] = []
        j = -1
        for item in output.scheduled:
            j += item.needs_sample
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens = item.context_len
            if not item.needs_sample:
                continue
            seq.append_token(int(sampled_token_ids[j]),
                             None if logprobs is None else logprobs[j],
                             None if top_logprobs is None else top_logprobs[j])
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            stop = self._check_stop(seq)
            if stop is not None:
                self._finish(seq, *stop)
                finished.append(seq)
        return finished

    def _check_stop(self, seq: Sequence) -> tuple[str, int | None] | None:
        params = seq.sampling_params
        token = seq.last_token_id
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token == seq.eos_token_id:
                return "stop", None
            if token in params.stop_token_ids:
                return "stop", token
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.config.max_model_len:
            return "length", None
        return None

    # --- finishing from outside --------------------------------------------------------------
    def finish(self, seq_id: int, reason: str, stop_reason: int | str | None = None) -> bool:
        """Finish a sequence for a reason found outside (a stop string: "stop"; a disconnect:
        "abort"). Frees its blocks at once. Returns False if it is unknown or already finished."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return False
        self._finish(seq, reason, stop_reason)
        return True

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Abort every unfinished sequence of a request, wherever it is; returns them."""
        aborted = [self._seqs[i] for i in sorted(self._requests.get(request_id, ()))]
        for seq in aborted:
            self._finish(seq, "abort")
        return aborted

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        status = SequenceStatus.finished(reason)  # validates before touching any state
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.set_finished(status.finish_reason, self.clock(), stop_reason)
        del self._seqs[seq.seq_id]
        siblings = self._requests[seq.request_id]
        siblings.discard(seq.seq_id)
        if not siblings:
            del self._requests[seq.request_id]
        self._finished_ids.append(seq.seq_id)

    # --- checks ------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if queues, sequences and blocks disagree."""
        bm = self.block_manager
        bm.check_invariants()
        running_ids = [s.seq_id for s in self.running]
        waiting_ids = [s.seq_id for s in self.waiting]
        assert len(set(running_ids)) == len(running_ids) and len(set(waiting_ids)) == len(waiting_ids)
        assert not set(running_ids) & set(waiting_ids), "a sequence is both running and waiting"
        assert set(running_ids) | set(waiting_ids) == set(self._seqs), "lost or stale sequence"
        assert bm.holder_seq_ids == frozenset(running_ids), "blocks held by non-running sequences"
        assert len(self.running) <= self.config.max_num_seqs
        assert [_age(s) for s in self.running] == sorted(_age(s) for s in self.running)
        for seq in self.running:
            assert seq.status is SequenceStatus.RUNNING
            assert 0 <= seq.num_computed_tokens < seq.num_tokens <= self.config.max_model_len
            assert bm.blocks_for(seq.num_tokens) - 1 <= len(seq.block_table) <= bm.blocks_for(seq.num_tokens)
        for seq in self.waiting:
            assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
            assert seq.num_computed_tokens == 0 and not seq.block_table
        for request_id, ids in self._requests.items():
            assert ids and all(self._seqs[i].request_id == request_id for i in ids)
