"""Engine statistics: counters and recent samples that the gateway exports as metrics.

Plain numbers and lists, read and reset by the exporter (`drain`), so the engine never depends on a
metrics library."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    # Samples since the last drain (seconds / counts), for histograms.
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    # Per finished sequence: first scheduled -> first token (prefill, chunks and waits between them
    # included), first token -> finish (decode).
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    tokens_per_step: list[int] = field(default_factory=list)
    expert_tokens: list[list[int]] = field(default_factory=list)  # [L][E] cumulative
    # Parallel groups (services/engine/parallel_runner.py). Collective time is rank 0's wall time inside
    # the model's all-reduces and gathers, waiting for the slowest rank included.
    collective_s_total: float = 0.0
    step_broadcast_s_total: float = 0.0  # rank 0 sending each step's description to the other ranks
    collective_s: list[float] = field(default_factory=list)  # per step, since the last drain
    rank_expert_tokens: list[int] = field(default_factory=list)  # [N] cumulative routes run by each rank

    def __post_init__(self) -> None:
        self.expert_tokens = [[0] * self.num_experts for _ in range(self.num_layers)]
        self._last_token_time: dict[int, float] = {}
        # Sequences finished during a step: forgotten only after that step's samples are taken.
        self._finished_seq_ids: set[int] = set()

    def record_step(self, step: SchedulerOutput, expert_counts: torch.Tensor, forward_s: float,
                    step_s: float, blocks: BlockManager) -> None:
        self.steps += not step.is_empty
        self.forward_s_total += forward_s
        self.step_s_total += step_s
        self.prompt_tokens += step.num_prefill_tokens
        self.generation_tokens += len(step.sampled)
        if not step.is_empty:
            self.tokens_per_step.append(step.num_batched_tokens)
        self.preemptions += len(step.preempted_seq_ids)
        self.kv_usage = blocks.usage
        self.prefix_queries, self.prefix_hits = blocks.prefix_cache_queries, blocks.prefix_cache_hits
        for s in step.sampled:
            seq = s.seq
            if seq.num_output_tokens == 1 and seq.first_token_time is not None:
                self.ttft.append(seq.first_token_time - seq.arrival_time)
                if seq.first_scheduled_time is not None:
                    self.queue.append(seq.first_scheduled_time - seq.arrival_time)
            elif seq.last_token_time is not None and seq.seq_id in self._last_token_time:
                self.itl.append(seq.last_token_time - self._last_token_time[seq.seq_id])
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
        self.collective_s.append(collective_s)
        if len(self.rank_expert_tokens) < len(rank_tokens):
            self.rank_expert_tokens += [0] * (len(rank_tokens) - len(self.rank_expert_tokens))
        for rank, tokens in enumerate(rank_tokens):
            self.rank_expert_tokens[rank] += tokens

    def record_finished(self, seq: Sequence) -> None:
        reason = seq.finish_reason or "abort"
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        if seq.finished_time is not None:
            self.e2e.append(seq.finished_time - seq.arrival_time)
            if seq.first_token_time is not None:
                self.decode.append(seq.finished_time - seq.first_token_time)
                if seq.first_scheduled_time is not None:
                    self.prefill.append(seq.first_token_time - seq.first_scheduled_time)
        self._finished_seq_ids.add(seq.seq_id)

    def record_abort(self, num_seqs: int) -> None:
        self.aborts += num_seqs

    def drain(self) -> dict[str, list]:
        """Histogram samples since the last call (and forget them)."""
        out = {"ttft": self.ttft, "itl": self.itl, "e2e": self.e2e, "queue": self.queue,
               "prefill": self.prefill, "decode": self.decode,
               "tokens_per_step": self.tokens_per_step, "collective_s": self.collective_s}
        self.ttft, self.itl, self.e2e, self.queue, self.tokens_per_step = [], [], [], [], []
        self.prefill, self.decode = [], []
        self.collective_s = []
        return out
