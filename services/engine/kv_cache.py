"""The paged KV cache's block manager: which fixed-size cache blocks each sequence owns. No torch.

Blocks are handed out from free lists and reference-counted, so sequences with a common prefix (n > 1
siblings, a shared system prompt) hold the same physical blocks. Prefix caching: a FULL block is
registered under the chain hash hash(parent_hash, its token ids); a later sequence walking its own
chain reuses every registered block it finds. A block whose last reference goes away keeps its
registration and stays reusable until a fresh block is needed and it is the least recently freed.

Exactness: a hit is accepted only if the block's stored token ids equal the request's AND the block
was registered after the very prefix the request has matched so far (each registered prefix gets an
identity, `content_id`, and a block remembers its parent's). A hash collision therefore costs a cache
miss, never wrong K/V.

When blocks become registered: the scheduler calls `commit` with the tokens a step will compute, so a
block is reusable from the step that fills it on. This relies on the runner writing every token's K/V
into the cache before any attention of that step reads it (per layer), which lets a sequence scheduled
later in the same step reuse blocks an earlier one is filling (n > 1 siblings admitted together).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from services.engine.sequence import Sequence

# content_id of the empty prefix: the parent of every sequence's first block.
ROOT_CONTENT_ID = 0
# Parent hash of a first block. An int rather than None: hash(None) varies between processes before
# Python 3.12, while the hash of a tuple of ints is the same in every process.
ROOT_HASH = 0


def hash_block_tokens(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Chain hash of a full block."""
    return hash((parent_hash, token_ids))


def num_kv_blocks(memory_bytes: int, *, num_layers: int, num_kv_heads: int, head_size: int,
                  block_size: int, dtype_bytes: int) -> int:
    """How many blocks (K and V, all layers) fit in `memory_bytes`."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_size", head_size), ("block_size", block_size),
                        ("dtype_bytes", dtype_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
        raise ValueError(f"memory_bytes must be a non-negative integer, got {memory_bytes!r}")
    bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_size * dtype_bytes
    return memory_bytes // bytes_per_block


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    # Set while the block is in the prefix-cache map (it is then full and immutable).
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    parent_content_id: int | None = None
    # Identity of the token prefix ending with this block; also set on a full block whose registration
    # was refused (same prefix already cached, or a colliding hash) so that its children can chain.
    content_id: int | None = None

    def clear_registration(self) -> None:
        self.hash = None
        self.token_ids = None
        self.parent_content_id = None
        self.content_id = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks holding nothing reusable: handed out first.
        self._free: deque[int] = deque(range(num_blocks))
        # Free blocks still registered in the prefix cache, least recently freed first (evicted first).
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._owners: dict[int, Sequence] = {}  # seq_id -> sequence holding blocks
        self._next_content_id = ROOT_CONTENT_ID + 1
        # Prefix-cache statistics, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # --- capacity ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take (cached ones included: they are evictable)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def holder_seq_ids(self) -> frozenset[int]:
        """Ids of the sequences holding blocks."""
        return frozenset(self._owners)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix matching ---------------------------------------------------------------------
    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])

    def _chain_hash(self, seq: Sequence, index: int) -> int:
        """Hash of seq's full block `index`, computing (and keeping) the chain up to it."""
        hashes = seq.block_hashes
        while len(hashes) <= index:
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if i else ROOT_HASH, self._block_tokens(seq, i)))
        return hashes[index]

    def _uses_prefix_cache(self, seq: Sequence) -> bool:
        # A sequence still owing prompt logprobs must compute every prompt row: cached rows have none.
        return self.enable_prefix_caching and not seq.needs_prompt_logprobs

    def _match_prefix(self, seq: Sequence) -> list[Block]:
        if not self._uses_prefix_cache(seq):
            return []
        # The last known token is always computed: its logits produce the next token.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        parent = ROOT_CONTENT_ID
        for i in range(max_blocks):
            block_id = self._hash_to_block.get(self._chain_hash(seq, i))
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_content_id != parent or block.token_ids != self._block_tokens(seq, i):
                break  # a hash collision: treat as a miss
            hits.append(block)
            parent = block.content_id
        return hits

    # --- allocation --------------------------------------------------------------------------
    def _fits(self, seq: Sequence, hits: list[Block]) -> bool:
        # A hit on a free cached block takes it off the free lists just like a fresh block.
        revived = sum(1 for b in hits if b.ref_count == 0)
        fresh = self.blocks_for(seq.num_tokens) - len(hits)
        return fresh + revived <= self.num_free_blocks

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all of seq's known tokens fit now, prefix hits counted."""
        return self._fits(seq, self._match_prefix(seq))

    def allocate(self, seq: Sequence) -> int:
        """Give seq blocks for all its known tokens, reusing cached prefix blocks. Sets
        num_computed_tokens to the tokens found cached and returns that count; on a first admission
        (no preemption yet) it is also recorded as seq.num_cached_tokens."""
        if seq.block_table or seq.seq_id in self._owners:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._match_prefix(seq)
        if not self._fits(seq, hits):
            raise RuntimeError(f"out of KV blocks allocating sequence {seq.seq_id}")
        for block in hits:
            if block.ref_count == 0:
                del self._cached_free[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        for _ in range(self.blocks_for(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_fresh_block())
        self._owners[seq.seq_id] = seq
        cached = len(hits) * self.block_size
        seq.num_computed_tokens = cached
        if seq.num_preemptions == 0:
            # What clients see as cached prompt tokens; a resume re-hitting its own blocks is not that.
            seq.num_cached_tokens = cached
        if self._uses_prefix_cache(seq):
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += cached
        return cached

    def can_append(self, seq: Sequence) -> bool:
        """Whether the blocks for seq's known tokens (its newest sampled token included) fit."""
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def may_append(self, seq: Sequence) -> None:
        """Add the block(s) seq needs to hold all its known tokens (one when it crosses a boundary)."""
        missing = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks appending to sequence {seq.seq_id}")
        for _ in range(missing):
            seq.block_table.append(self._take_fresh_block())

    def _take_fresh_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)  # evict the least recently freed
            block = self.blocks[block_id]
            del self._hash_to_block[block.hash]
            block.clear_registration()
        self.blocks[block_id].ref_count = 1
        return block_id

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Tokens [0, num_tokens) of seq will be in the cache after this step: register the blocks
        that become full. Call before advancing seq.num_computed_tokens."""
        if not self.enable_prefix_caching:
            return
        if num_tokens > len(seq.block_table) * self.block_size:
            raise RuntimeError(f"sequence {seq.seq_id} commits {num_tokens} tokens beyond its blocks")
        first = seq.num_computed_tokens // self.block_size
        for i in range(first, num_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.content_id is not None:
                continue  # a prefix hit: already registered
            parent = ROOT_CONTENT_ID if i == 0 else self.blocks[seq.block_table[i - 1]].content_id
            if parent is None:
                break  # cannot happen when commits follow the computed tokens; never guess a prefix
            h = self._chain_hash(seq, i)
            tokens = self._block_tokens(seq, i)
            existing_id = self._hash_to_block.get(h)
            if existing_id is None:
                block.hash, block.token_ids, block.parent_content_id = h, tokens, parent
                block.content_id = self._new_content_id()
                self._hash_to_block[h] = block.block_id
                continue
            existing = self.blocks[existing_id]
            if existing.parent_content_id == parent and existing.token_ids == tokens:
                # Same prefix filled twice (computed concurrently): keep one registered copy, but
                # chain this block's children to the shared identity.
                block.content_id = existing.content_id
            else:
                block.content_id = self._new_content_id()  # collision: this prefix stays uncached

    def _new_content_id(self) -> int:
        content_id = self._next_content_id
        self._next_content_id += 1
        return content_id

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (cached ones stay reusable) and reset its computed-token count."""
        # The tail first: with LRU eviction a sequence's last blocks, the least shared, go first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None:
                self._cached_free[block_id] = None
            else:
                block.clear_registration()
                self._free.append(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        self._owners.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every free cached block (e.g. after new weights are loaded)."""
        while self._cached_free:
            block_id, _ = self._cached_free.popitem(last=False)
            block = self.blocks[block_id]
            del self._hash_to_block[block.hash]
            block.clear_registration()
            self._free.append(block_id)
        for block in self.blocks:
            # Held blocks stay usable by their owners but must not be found again; they keep their
            # content_id so that their owners' later blocks still chain (to an unreachable prefix).
            if block.hash is not None:
                del self._hash_to_block[block.hash]
                block.hash = block.token_ids = block.parent_content_id = None

    # --- checks ------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the allocator's bookkeeping is inconsistent."""
        free = set(self._free)
        cached = set(self._cached_free)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & cached, "a block is in both free lists"
        holders: dict[int, int] = {}
        for seq_id, seq in self._owners.items():
            assert seq.seq_id == seq_id
            assert len(set(seq.block_table)) == len(seq.block_table), f"seq {seq_id} repeats a block"
            for block_id in seq.block_table:
                holders[block_id] = holders.get(block_id, 0) + 1
        for block in self.blocks:
            refs = holders.get(block.block_id, 0)
            assert block.ref_count == refs, (
                f"block {block.block_id}: ref_count {block.ref_count} but {refs} tables hold it")
            in_free = block.block_id in free
            in_cached = block.block_id in cached
            assert (refs > 0) + in_free + in_cached == 1, (
                f"block {block.block_id} is not exactly one of held/free/cached")
            if in_free:
                assert block.hash is None and block.content_id is None
            if in_cached:
                assert block.hash is not None
            if block.hash is not None:
                assert self._hash_to_block.get(block.hash) == block.block_id, (
                    f"block {block.block_id} has a hash the map does not point back from")
                assert block.token_ids is not None and len(block.token_ids) == self.block_size
                assert block.content_id is not None and block.parent_content_id is not None
        for h, block_id in self._hash_to_block.items():
            assert self.blocks[block_id].hash == h, f"map entry {h} -> {block_id} is stale"
