"""Top-k gating in one Triton launch: softmax, top-k, expert counts, and the padded sorted layout.

One program does it all. Routing tensors are tiny (T x 8 logits), so one launch beats the three to
five launches of a histogram / prefix-sum / scatter pipeline at decode sizes, where each pass is a
single trip over one chunk; a prefill of thousands of tokens takes a few dozen trips.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_inputs import check_gating_inputs
from .routing import Routing, padded_capacity
from .triton_launch import check_device, next_power_of_2

# Legend: T = tokens, K = top_k, S = T * K slots, E = experts, L = local experts, P = padded capacity.


@triton.jit
def _topk_gating_kernel(
    logits_ptr, expert_map_ptr, weights_ptr, ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    local_counts_ptr, counts_out_ptr,
    num_tokens, capacity, stride_logits,
    NUM_EXPERTS: tl.constexpr, NUM_LOCAL: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr, HAS_MAP: tl.constexpr, HAS_COUNTS_OUT: tl.constexpr,
):
    e_idx = tl.arange(0, BLOCK_E)
    e_valid = e_idx < NUM_EXPERTS
    l_idx = tl.arange(0, BLOCK_L)
    l_valid = l_idx < NUM_LOCAL
    global_hist = tl.zeros([BLOCK_E], dtype=tl.int32)
    local_hist = tl.zeros([BLOCK_L], dtype=tl.int32)

    # Pass 1: softmax and top-k per token; count routes per global and per local expert.
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_valid = t < num_tokens
        logits = tl.load(logits_ptr + t[:, None] * stride_logits + e_idx[None, :],
                         mask=t_valid[:, None] & e_valid[None, :], other=0.0)  # [BT, BE]
        # Rows past T read zeros, not -inf, so that no row is all -inf (nan) and nothing warns.
        logits = tl.where(e_valid[None, :], logits, -float("inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        p = tl.where(e_valid[None, :], p, -1.0)  # below every probability: never chosen
        for j in tl.static_range(TOP_K):
            best = tl.max(p, axis=1)  # [BT]
            # Ties go to the lower expert id, as jax.lax.top_k breaks them.
            choice = tl.min(tl.where(p == best[:, None], e_idx[None, :], BLOCK_E), axis=1)
            tl.store(weights_ptr + t * TOP_K + j, best, mask=t_valid)
            tl.store(ids_ptr + t * TOP_K + j, choice, mask=t_valid)
            p = tl.where(e_idx[None, :] == choice[:, None], -1.0, p)
            chosen = (choice[:, None] == e_idx[None, :]) & t_valid[:, None]  # [BT, BE]
            global_hist += tl.sum(chosen.to(tl.int32), axis=0)
            if HAS_MAP:
                local = tl.load(expert_map_ptr + choice, mask=t_valid, other=-1)
            else:
                local = choice
            held = (local[:, None] == l_idx[None, :]) & t_valid[:, None]  # [BT, BL]
            local_hist += tl.sum(held.to(tl.int32), axis=0)

    padded = tl.where(l_valid, (local_hist + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)  # [BL]
    padded_ends = tl.cumsum(padded, axis=0)
    padded_starts = padded_ends - padded
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    tl.store(local_counts_ptr + l_idx, local_hist, mask=l_valid)
    if HAS_COUNTS_OUT:
        # One program owns the whole tensor: a plain read-modify-write needs no atomics.
        old = tl.load(counts_out_ptr + e_idx, mask=e_valid, other=0)
        tl.store(counts_out_ptr + e_idx, old + global_hist.to(tl.int64), mask=e_valid)
    # Pass 2 reads the ids other threads of this program stored in pass 1.
    tl.debug_barrier()

    # Pass 2: scatter each routed slot to its expert's next free position, slot order kept.
    num_slots = num_tokens * TOP_K
    cursor = padded_starts
    for s0 in range(0, num_slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_valid = s < num_slots
        ids = tl.load(ids_ptr + s, mask=s_valid, other=0)
        if HAS_MAP:
            local = tl.load(expert_map_ptr + ids, mask=s_valid, other=-1)
        else:
            local = ids
        local = tl.where(s_valid, local, -1)
        onehot = (local[:, None] == l_idx[None, :]).to(tl.int32)  # [BS, BL]
        earlier = tl.cumsum(onehot, axis=0) - onehot  # same-expert slots before this one in the chunk
        pos = tl.sum(onehot * (earlier + cursor[None, :]), axis=1)
        tl.store(sorted_ptr + pos, s, mask=local >= 0)
        cursor += tl.sum(onehot, axis=0)

    # Pass 3: sentinels in the padding, and the expert of each block. Disjoint from pass 2's stores.
    for p0 in range(0, capacity, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_valid = p < capacity
        # The expert whose padded run holds p: the number of runs ending at or before p.
        expert = tl.sum(((padded_ends[None, :] <= p[:, None]) & l_valid[None, :]).to(tl.int32), axis=1)
        mine = expert[:, None] == l_idx[None, :]  # [BP, BL]
        start = tl.sum(tl.where(mine, padded_starts[None, :], 0), axis=1)
        count = tl.sum(tl.where(mine, local_hist[None, :], 0), axis=1)
        beyond = expert >= NUM_LOCAL
        tl.store(sorted_ptr + p, num_slots + 0 * p, mask=p_valid & (beyond | (p - start >= count)))
        tl.store(block_expert_ptr + p // BLOCK_M, tl.where(beyond, -1, expert),
                 mask=p_valid & (p % BLOCK_M == 0))


def _chunk(n: int, cap: int) -> int:
    # Powers of two from 16 up, so that few kernel variants get compiled.
    return min(cap, next_power_of_2(max(16, n)))


def topk_gating(router_logits: torch.Tensor, top_k: int, block_m: int, num_local_experts: int | None = None,
                expert_map: torch.Tensor | None = None,
                expert_counts_out: torch.Tensor | None = None) -> Routing:
    """router_logits float32 [T, E] -> Routing (see kernels.reference.topk_gating)."""
    num_local = check_gating_inputs(router_logits, top_k, num_local_experts, expert_map, expert_counts_out)
    check_device(_topk_gating_kernel, router_logits)
    num_tokens = router_logits.shape[0]
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    device = logits.device
    capacity = padded_capacity(num_tokens * top_k, num_local, block_m)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)  # [T, K]
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)  # [T, K]
    sorted_slot_ids = torch.empty(capacity, dtype=torch.int32, device=device)  # [P]
    block_expert_ids = torch.empty(capacity // block_m, dtype=torch.int32, device=device)  # [P / block_m]
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    expert_counts = torch.empty(num_local, dtype=torch.int32, device=device)  # [L]
    routing = Routing(topk_weights=weights, topk_ids=ids, sorted_slot_ids=sorted_slot_ids,
                      block_expert_ids=block_expert_ids, num_padded=num_padded, expert_counts=expert_counts,
                      block_m=block_m)
    grid, args, keywords = gating_launch(logits, routing, expert_map, expert_counts_out)
    _topk_gating_kernel[grid](*args, **keywords)
    return routing


def gating_launch(logits: torch.Tensor, routing: Routing, expert_map: torch.Tensor | None,
                  expert_counts_out: torch.Tensor | None) -> tuple[tuple, tuple, dict]:
    """(grid, arguments, keywords) of the launch that fills `routing`, shared with kernels.aot."""
    num_tokens, num_experts = logits.shape
    num_local, top_k = routing.num_local_experts, routing.top_k
    capacity = routing.sorted_slot_ids.shape[0]
    args = (logits, logits if expert_map is None else expert_map, routing.topk_weights, routing.topk_ids,
            routing.sorted_slot_ids, routing.block_expert_ids, routing.num_padded, routing.expert_counts,
            logits if expert_counts_out is None else expert_counts_out, num_tokens, capacity, logits.stride(0))
    keywords = {
        "NUM_EXPERTS": num_experts, "NUM_LOCAL": num_local, "TOP_K": top_k, "BLOCK_M": routing.block_m,
        "BLOCK_E": next_power_of_2(max(2, num_experts)), "BLOCK_L": next_power_of_2(max(2, num_local)),
        # Chunks as large as the data up to a cap: decode runs each pass in one trip, prefill in few.
        "BLOCK_T": _chunk(num_tokens, 256), "BLOCK_S": _chunk(num_tokens * top_k, 512),
        "BLOCK_P": _chunk(capacity, 1024),
        "HAS_MAP": expert_map is not None, "HAS_COUNTS_OUT": expert_counts_out is not None,
        "num_warps": 4 if capacity <= 1024 else 8,
    }
    return (1,), args, keywords
