"""What one forward step needs to read and write the paged KV cache.

A step computes T tokens taken from several sequences. Decode sequences (one query token each) come first,
then prefill chunks (several query tokens each, possibly the middle of a long prompt). Legend:
T tokens in the step, B_d decode sequences, M max blocks per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillChunk:
    query_start: int  # offset of the chunk's first token in the step
    query_len: int
    context_len: int  # tokens of the sequence in the cache once this chunk is written
    block_table: torch.Tensor  # [ceil(context_len / block_size)] int64


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) of each token
    decode_block_tables: torch.Tensor  # [B_d, M] int64, padded with block 0
    decode_context_lens: torch.Tensor  # [B_d] int64, this step's token included
    prefills: tuple[PrefillChunk, ...] = ()

    @property
    def num_decode(self) -> int:
        return int(self.decode_block_tables.shape[0])

    def to(self, device: torch.device) -> AttentionMetadata:
        """The same metadata on the KV cache's device: one move per step, not one per layer."""
        if self.slot_mapping.device == device:
            return self
        prefills = tuple(PrefillChunk(c.query_start, c.query_len, c.context_len, c.block_table.to(device))
                         for c in self.prefills)
        return AttentionMetadata(self.slot_mapping.to(device), self.decode_block_tables.to(device),
                                 self.decode_context_lens.to(device), prefills)

    @classmethod
    def for_single_sequence(cls, start: int, num_tokens: int, block_table: torch.Tensor,
                            block_size: int) -> AttentionMetadata:
        """Tokens [start, start + num_tokens) of one sequence whose blocks are `block_table`."""
        positions = torch.arange(start, start + num_tokens)
        slots = block_table[positions // block_size] * block_size + positions % block_size
        chunk = PrefillChunk(0, num_tokens, start + num_tokens, block_table)
        empty = torch.zeros((0, 1), dtype=torch.int64)
        return cls(slots, empty, torch.zeros(0, dtype=torch.int64), (chunk,))
