"""What one rank of a parallel group holds, and how it talks to the others.

Grok-1 on N ranks (N divides the kv heads and the experts): attention heads are split in contiguous
groups (q heads stay with their kv head: the reference groups q heads kv-major), expert e lives on rank
e mod N, the vocabulary (embedding and tied LM head) is split in contiguous row ranges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from services.model.config import Grok1Config


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a group of size {self.size}")

    def check(self, config: Grok1Config) -> None:
        for name in ("num_kv_heads", "num_experts", "vocab_size"):
            if getattr(config, name) % self.size:
                raise ValueError(f"a parallel size of {self.size} does not divide {name}={getattr(config, name)}")
        if config.int8_row_blocks % self.size and self.size % config.int8_row_blocks:
            raise ValueError(f"a parallel size of {self.size} does not split int8_row_blocks="
                             f"{config.int8_row_blocks} evenly")

    def q_heads(self, config: Grok1Config) -> range:
        n = config.num_q_heads // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def kv_heads(self, config: Grok1Config) -> range:
        n = config.num_kv_heads // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def experts(self, config: Grok1Config) -> list[int]:
        return list(range(self.rank, config.num_experts, self.size))

    def vocab_rows(self, config: Grok1Config) -> range:
        n = config.vocab_size // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def expert_map(self, config: Grok1Config) -> torch.Tensor | None:
        """Global expert id -> local index, -1 where held elsewhere; None when this rank holds all."""
        if self.size == 1:
            return None
        table = torch.full((config.num_experts,), -1, dtype=torch.int32)
        for local, expert in enumerate(self.experts(config)):
            table[expert] = local
        return table


class Comm(Protocol):
    """The collectives the sharded model needs (torch.distributed in a group; identity alone)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...


class SingleRank:
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x
