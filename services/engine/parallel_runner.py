"""Rank 0's model runner for a parallel group: broadcast the step, run rank 0's shard, return the logits.

Every rank runs the same forward (the collectives need them all); only rank 0 samples. The KV caches
live on every rank (each its own kv heads) under a cache id: the engine's, and a scratch one for `score`.
Legend: S sampled rows, V vocabulary, N ranks, E experts, L layers.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from services.engine.parallel import Command, ParallelGroup
from services.engine.runner import ModelRunner, StepInputs
from services.engine.scheduler import SchedulerOutput
from services.engine.stats import EngineStats
from services.engine.worker import forward_logits
from services.model.attention_metadata import AttentionMetadata

ENGINE_CACHE, SCRATCH_CACHE = 0, 1


class ParallelRunner(ModelRunner):
    def __init__(self, group: ParallelGroup, num_blocks: int, block_size: int,
                 stats: EngineStats | None = None):
        super().__init__(group.model, num_blocks, block_size)
        self.group, self.stats = group, stats
        self.last_collective_s = 0.0
        self.last_broadcast_s = 0.0
        config = group.model.config
        # Expert e lives on rank e mod N (services/model/shard.py): [E] -> rank, to count tokens per rank.
        self._rank_of_expert = torch.arange(config.num_experts, device=self.device) % group.size
        group.send(Command.ALLOC_KV, ENGINE_CACHE, (num_blocks, block_size))

    def _run(self, cache: int, inputs: StepInputs, kv: tuple[torch.Tensor, torch.Tensor],
             count_experts: bool) -> torch.Tensor:
        self.group.broadcast_step(cache, inputs)
        try:
            return forward_logits(self.model, kv, inputs, count_experts)
        except Exception as exc:  # a peer died or stalled inside a collective
            raise self.group.fail(exc) from exc

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """float32 logits [S, V] for the entries of `step.sampled`, in order."""
        inputs = self.prepare(step)
        started = time.perf_counter()
        logits = self._run(ENGINE_CACHE, inputs, self.kv_cache, count_experts=True)
        self.last_forward_s = time.perf_counter() - started
        self.last_collective_s = self.group.comm.timer.take()
        channel = self.group.rank0.channel
        self.last_broadcast_s, channel.seconds = channel.seconds, 0.0
        if self.stats is not None:
            # The router is replicated, so rank 0's per-expert counts of this step are the group's.
            per_expert = self.model.expert_counts.sum(0)  # [E], reset by the engine after the step
            per_rank = torch.zeros(self.group.size, dtype=torch.int64, device=self.device)
            per_rank.index_add_(0, self._rank_of_expert, per_expert)
            self.stats.record_collectives(self.last_collective_s, self.last_broadcast_s, per_rank.tolist())
        return logits

    @torch.inference_mode()
    def score(self, token_ids, chunk_size: int | None = None) -> np.ndarray:
        """float32 logits [len, V] at every position of one sequence, computed by the whole group (the
        parallel counterpart of Grok1.score), in a scratch cache that leaves the engine's untouched."""
        config = self.model.config
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        n = int(ids.shape[0])
        if n == 0 or n > config.max_seq_len:
            raise ValueError(f"score needs 1..{config.max_seq_len} tokens, got {n}")
        if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {config.vocab_size})")
        block_size = self.block_size
        num_blocks = -(-n // block_size)
        table = torch.arange(num_blocks)
        self.group.send(Command.ALLOC_KV, SCRATCH_CACHE, (num_blocks, block_size))
        kv = self.model.allocate_kv_cache(num_blocks, block_size)
        out = []
        step = chunk_size or n
        for start in range(0, n, step):
            end = min(n, start + step)
            meta = AttentionMetadata.for_single_sequence(start, end - start, table, block_size)
            inputs = StepInputs(ids[start:end], torch.arange(start, end), meta, torch.arange(end - start))
            out.append(self._run(SCRATCH_CACHE, inputs, kv, count_experts=False))
        self.group.send(Command.FREE_KV, SCRATCH_CACHE)
        self.group.comm.timer.take()  # scoring is not an engine step: keep its time out of the stats
        self.group.rank0.channel.seconds = 0.0
        return torch.cat(out).cpu().numpy()

    def shutdown(self) -> None:
        self.group.shutdown()
