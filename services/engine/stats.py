"""Engine statistics: counters, and histograms the gateway exports as metrics.

Plain numbers and fixed-bucket histograms (histogram.py), so the engine never depends on a metrics
library and its statistics take the same memory after a billion tokens as after one, whether or not
anything reads them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from services.engine.histogram import ENGINE_BUCKETS, BucketHistogram
from services.engine.kv_cache import BlockManager
from services.engine.scheduler import SchedulerOutput
from services.engine.sequence import Sequence


@dataclass
class EngineStats:
    num_layers: int
    num_experts: int
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    aborts: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    forward_s_total: float = 0.0
    step_s_total: float = 0.0
    # Since start, by snapshot key (histogram.ENGINE_BUCKETS): ttft, itl, e2e, queue; per finished
    # sequence prefill (first scheduled -> first token, chunks and the waits between them included) and
    # decode (first token -> finish); tokens_per_step; collective_s (rank 0's collective time per step).
    histograms: dict[str, BucketHistogram] = field(default_factory=dict)
    expert_tokens: list[list[int]] = field(default_factory=list)  # [L][E] cumulative
    # Parallel groups (services/engine/parallel_runner.py). Collective time is rank 0's wall time inside
    # the model's all-reduces and gathers, waiting for the slowest rank included.
    collective_s_total: float = 0.0
    step_broadcast_s_total: float = 0.0  # rank 0 sending each step's description to the other ranks
    rank_expert_tokens: list[int] = field(default_factory=list)  # [N] cumulative routes run by each rank

    def __post_init__(self) -> None:
        self.expert_tokens = [[0] * self.num_experts for _ in range(self.num_layers)]
        self.histograms = {key: BucketHistogram(bounds) for key, bounds in ENGINE_BUCKETS.items()}
        # Only sequences that are still running have an entry: it is dropped when they finish.
        self._last_token_time: dict[int, float] = {}
        # Sequences finished during a step: forgotten only after that step's samples are taken.
        self._finished_seq_ids: set[int] = set()

    def _observe(self, key: str, value: float) -> None:
        self.histograms[key].observe(value)

    def record_step(self, step: SchedulerOutput, expert_counts: torch.Tensor, forward_s: float,
                    step_s: float, blocks: BlockManager) -> None:
        self.steps += not step.is_empty
        self.forward_s_total += forward_s
        self.step_s_total += step_s
        self.prompt_tokens += step.num_prefill_tokens
        self.generation_tokens += len(step.sampled)
        if not step.is_empty:
            self._observe("tokens_per_step", step.num_batched_tokens)
        self.preemptions += len(step.preempted_seq_ids)
        self.kv_usage = blocks.usage
        self.prefix_queries, self.prefix_hits = blocks.prefix_cache_queries, blocks.prefix_cache_hits
        for s in step.sampled:
            seq = s.seq
            if seq.num_output_tokens == 1 and seq.first_token_time is not None:
                self._observe("ttft", seq.first_token_time - seq.arrival_time)
                if seq.first_scheduled_time is not None:
                    self._observe("queue", seq.first_scheduled_time - seq.arrival_time)
            elif seq.last_token_time is not None and seq.seq_id in self._last_token_time:
                self._observe("itl", seq.last_token_time - self._last_token_time[seq.seq_id])
            if seq.last_token_time is not None:
                self._last_token_time[seq.seq_id] = seq.last_token_time
        for seq_id in self._finished_seq_ids:
            self._last_token_time.pop(seq_id, None)
        self._finished_seq_ids.clear()
        if not step.is_empty:
            # One host read per step, after the forward: the device-side counters are then reset.
            counts = expert_counts.tolist()
            expert_counts.zero_()
            for layer, row in enumerate(counts):
                for e, c in enumerate(row):
                    self.expert_tokens[layer][e] += c

    def record_collectives(self, collective_s: float, broadcast_s: float, rank_tokens: list[int]) -> None:
        self.collective_s_total += collective_s
        self.step_broadcast_s_total += broadcast_s
        self._observe("collective_s", collective_s)
        if len(self.rank_expert_tokens) < len(rank_tokens):
            self.rank_expert_tokens += [0] * (len(rank_tokens) - len(self.rank_expert_tokens))
        for rank, tokens in enumerate(rank_tokens):
            self.rank_expert_tokens[rank] += tokens

    def record_finished(self, seq: Sequence) -> None:
        reason = seq.finish_reason or "abort"
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        if seq.finished_time is not None:
            self._observe("e2e", seq.finished_time - seq.arrival_time)
            if seq.first_token_time is not None:
                self._observe("decode", seq.finished_time - seq.first_token_time)
                if seq.first_scheduled_time is not None:
                    self._observe("prefill", seq.first_token_time - seq.first_scheduled_time)
        self._finished_seq_ids.add(seq.seq_id)

    def record_abort(self, num_seqs: int) -> None:
        self.aborts += num_seqs

    def histogram_states(self) -> dict[str, dict[str, Any]]:
        """Every histogram since start as plain data (BucketHistogram.state), for a snapshot. Reading
        resets nothing: the histograms are cumulative, so any number of readers see the same figures."""
        return {key: h.state() for key, h in self.histograms.items()}
