"""The model runner: one scheduled step -> the model's tensors -> logits of the tokens to sample.

Legend: T tokens in the step, B_d decode sequences, M blocks of the longest decode, S sampled rows,
V vocabulary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from services.engine.scheduler import SchedulerOutput
from services.model.attention_metadata import AttentionMetadata, PrefillChunk
from services.model.grok1 import Grok1


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    # [S + P] rows of the step whose logits are computed: the sampled ones, then prompt-logprob rows
    sample_indices: torch.Tensor


class ModelRunner:
    def __init__(self, model: Grok1, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache = self._allocate_kv_cache(num_blocks, block_size)
        self.device = model.in_out_embed.embeddings.device
        self.last_forward_s = 0.0

    def _allocate_kv_cache(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.allocate_kv_cache(num_blocks, block_size)

    def prepare(self, step: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids, positions, slots = [], [], []
        for s in step.scheduled:
            table = s.block_table
            ids.extend(s.token_ids)
            for p in s.positions:
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
        decodes = step.decodes
        width = max((len(s.block_table) for s in decodes), default=1)
        decode_tables = torch.tensor([list(s.block_table) + [0] * (width - len(s.block_table))
                                      for s in decodes], dtype=torch.int64).reshape(len(decodes), width)
        decode_lens = torch.tensor([s.context_len for s in decodes], dtype=torch.int64)
        chunks, offset = [], len(decodes)
        for s in step.prefills:
            blocks = -(-s.context_len // bs)
            chunks.append(PrefillChunk(offset, s.num_tokens, s.context_len,
                                       torch.tensor(s.block_table[:blocks], dtype=torch.int64)))
            offset += s.num_tokens
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64), decode_tables, decode_lens,
                                 tuple(chunks))
        return StepInputs(torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                          meta, torch.tensor(step.logits_indices(), dtype=torch.int64))

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """float32 logits [S + P, V]: the entries of `step.sampled` in order, then the P rows of
        `step.prompt_logprob_rows()`."""
        inputs = self.prepare(step)
        started = time.perf_counter()
        hidden = self.model(inputs.input_ids.to(self.device), inputs.positions.to(self.device),
                            self.kv_cache, inputs.meta)
        logits = self.model.compute_logits(hidden[inputs.sample_indices.to(self.device)])
        self.last_forward_s = time.perf_counter() - started
        return logits
