"""Grok-1 in PyTorch, computing what the released JAX reference computes.

Legend: T tokens in the step, D emb_size, F ffn_size, Hq/K q/kv heads held by this rank,
G = Hq / K q heads per kv head, Dh key_size, E experts (E_l held here), V vocabulary (V_l held here),
L layers, N cache blocks, S block size.

Module and buffer names follow the release checkpoint (`decoder_layer.3.multi_head_attention.query.w`
is `transformer/decoder_layer_3/multi_head_attention/query/w`); weights keep its [in, out] layout so
that int8 weights and their row-blocked scales load unchanged. `moe.linear_linear_v` holds the release's
`moe/linear` and `moe/linear_v` side by side on the output dimension, the layout the MoE kernels consume.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels.dispatch import MOE_BACKENDS, ExpertWeights, dense_matmul, fused_moe, pack_weight
from services.model.attention_metadata import AttentionMetadata
from services.model.config import Grok1Config
from services.model.paged_attention import AttentionWorkspace, paged_attention, write_kv
from services.model.quant import dequantize
from services.model.shard import Comm, Shard, SingleRank


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("scale", torch.ones(size, dtype=torch.float32))  # [D], float32 as released

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # float32 statistics whatever the activation dtype; `scale * normed`, no `1 + scale`; one
        # rounding, to out_dtype (default x's).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.scale * normed).to(out_dtype or x.dtype)


class Linear(nn.Module):
    """y = x @ w; `w` [in, out] in the compute dtype, or int8 with bfloat16 `scales` [R, out]."""

    def __init__(self, in_size: int, out_size: int, dtype: torch.dtype, int8: bool, row_blocks: int = 1):
        super().__init__()
        self.register_buffer("w", torch.zeros(in_size, out_size, dtype=torch.int8 if int8 else dtype))
        scales = torch.ones(row_blocks, out_size, dtype=torch.bfloat16) if int8 else None
        self.register_buffer("scales", scales)
        self.packed: torch.Tensor | None = None  # `w` laid out for the CPU GEMM (Grok1.pack_for_cpu)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.w if self.scales is None else dequantize(self.w, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_matmul(x, self.weight(x.dtype), self.packed)


class ExpertLinear(nn.Module):
    """Stacked expert weights `w` [E_l, in, out] (or int8 with `scales` [E_l, R, out])."""

    def __init__(self, experts: int, in_size: int, out_size: int, dtype: torch.dtype, int8: bool,
                 row_blocks: int = 1):
        super().__init__()
        self.register_buffer("w", torch.zeros(experts, in_size, out_size,
                                              dtype=torch.int8 if int8 else dtype))
        scales = torch.ones(experts, row_blocks, out_size, dtype=torch.bfloat16) if int8 else None
        self.register_buffer("scales", scales)
        self.packed: tuple[torch.Tensor, ...] | None = None  # per expert, see Grok1.pack_for_cpu


class RotaryEmbedding(nn.Module):
    """NeoX-style rotate-half RoPE; phases computed in float32 as the reference does."""

    def __init__(self, head_size: int, base: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
        phase = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        phase = torch.cat([phase, phase], dim=-1)  # [P, Dh]
        self.register_buffer("cos", phase.cos(), persistent=False)
        self.register_buffer("sin", phase.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [T, H, Dh]; the rotation happens in float32, then rounds back to the activation dtype.
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [T, 1, Dh]
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, config: Grok1Config, shard: Shard, dtype: torch.dtype, int8: bool):
        super().__init__()
        self.num_q_heads = config.num_q_heads // shard.size
        self.num_kv_heads = config.num_kv_heads // shard.size
        self.key_size = config.key_size
        self.multiplier = config.attn_output_multiplier
        self.softcap = config.attn_logit_softcap
        q_size, kv_size = self.num_q_heads * config.key_size, self.num_kv_heads * config.key_size
        d = config.emb_size
        self.query = Linear(d, q_size, dtype, int8)
        self.key = Linear(d, kv_size, dtype, int8)
        self.value = Linear(d, kv_size, dtype, int8)
        # Row-parallel: each rank's rows cover size/N of the released row blocks.
        self.linear = Linear(q_size, d, dtype, int8, max(1, config.int8_row_blocks // shard.size))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                workspace: AttentionWorkspace) -> torch.Tensor:
        T, K, Dh = x.shape[0], self.num_kv_heads, self.key_size
        q = rope(self.query(x).view(T, self.num_q_heads, Dh), positions)  # [T, Hq, Dh]
        k = rope(self.key(x).view(T, K, Dh), positions)  # [T, K, Dh]
        v = self.value(x).view(T, K, Dh)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        # kv-major grouping: q head h reads kv head h // G.
        q = q.view(T, K, self.num_q_heads // K, Dh)  # [T, K, G, Dh]
        out = paged_attention(q, k_cache, v_cache, meta, self.multiplier, self.softcap, workspace)
        return self.linear(out.reshape(T, self.num_q_heads * Dh))  # [T, D], partial sum over ranks


class Router(nn.Module):
    def __init__(self, config: Grok1Config):
        super().__init__()
        self.register_buffer("w", torch.zeros(config.emb_size, config.num_experts,
                                              dtype=torch.float32))  # [D, E] whatever the default dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.w  # [T, E]: float32 logits, no softcap (the reference has none)


class MoE(nn.Module):
    def __init__(self, config: Grok1Config, shard: Shard, expert_dtype: torch.dtype):
        super().__init__()
        experts, d, f = len(shard.experts(config)), config.emb_size, config.ffn_size
        self.top_k = config.num_selected_experts
        int8 = expert_dtype == torch.int8
        self.linear_linear_v = ExpertLinear(experts, d, 2 * f, expert_dtype, int8)
        self.linear_1 = ExpertLinear(experts, f, d, expert_dtype, int8, config.int8_row_blocks)
        self.register_buffer("expert_map", shard.expert_map(config), persistent=False)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor,
                expert_counts: torch.Tensor | None) -> torch.Tensor:
        weights = ExpertWeights(self.linear_linear_v.w, self.linear_1.w,
                                self.linear_linear_v.scales, self.linear_1.scales,
                                self.linear_linear_v.packed, self.linear_1.packed)
        return fused_moe(x, router_logits, weights, self.top_k, self.expert_map, expert_counts, self.backend)


class DecoderLayer(nn.Module):
    """The residual stream h arrives and leaves in whatever dtype the caller keeps it in (float32 for
    Grok1 with float32_residual); attention and the experts run in the compute dtype."""

    def __init__(self, config: Grok1Config, shard: Shard, dtype: torch.dtype, int8: bool,
                 expert_dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        eps = config.rms_norm_eps
        self.multi_head_attention = MultiHeadAttention(config, shard, dtype, int8)
        self.router = Router(config)
        self.moe = MoE(config, shard, expert_dtype)
        # Named in creation order as the release: pre-attention, post-attention, pre-MoE, post-MoE.
        self.rms_norm = RMSNorm(config.emb_size, eps)
        self.rms_norm_1 = RMSNorm(config.emb_size, eps)
        self.rms_norm_2 = RMSNorm(config.emb_size, eps)
        self.rms_norm_3 = RMSNorm(config.emb_size, eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, comm: Comm,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                expert_counts: torch.Tensor | None, workspace: AttentionWorkspace) -> torch.Tensor:
        attn = self.multi_head_attention(self.rms_norm(h, self.dtype), positions, rope, k_cache, v_cache, meta,
                                         workspace)
        h = h + self.rms_norm_1(comm.all_reduce(attn), h.dtype)
        # The router reads the normed stream unrounded: near-tied top-2 choices are where bfloat16
        # runs part from the float32 reference.
        x = self.rms_norm_2(h, torch.float32)
        moe = self.moe(x.to(self.dtype), self.router(x), expert_counts)
        return h + self.rms_norm_3(comm.all_reduce(moe), h.dtype)


class InOutEmbed(nn.Module):
    def __init__(self, config: Grok1Config, shard: Shard, dtype: torch.dtype):
        super().__init__()
        rows = shard.vocab_rows(config)
        self.first_row = rows.start
        self.register_buffer("embeddings", torch.zeros(len(rows), config.emb_size, dtype=dtype))  # [V_l, D]


class Grok1(nn.Module):
    """int8: keep the released int8 weights (and scales) instead of dequantizing them at load.
    expert_dtype: how the experts (97 % of the weights) are stored, int8 or a float dtype; default int8
    when int8 is set, else the compute dtype. bfloat16 experts on int8 attention is the H200 preset:
    no dequantization in the expert GEMMs, twice the bytes per step.

    float32_residual: keep the residual stream h in float32 whatever the compute dtype (one
    [T, D] add per sublayer: no measurable cost next to the weights a step streams). Off by default
    so that embedders of the layers (the vLLM plugin) get hidden states in the model dtype."""

    def __init__(self, config: Grok1Config, dtype: torch.dtype = torch.float32, *, int8: bool = False,
                 shard: Shard | None = None, comm: Comm | None = None, float32_residual: bool = False,
                 expert_dtype: torch.dtype | None = None):
        super().__init__()
        expert_dtype = expert_dtype or (torch.int8 if int8 else dtype)
        shard = shard or Shard()
        shard.check(config)
        self.config, self.dtype, self.shard = config, dtype, shard
        self.residual_dtype = torch.float32 if float32_residual else dtype
        self.comm = comm if comm is not None else SingleRank()
        self.in_out_embed = InOutEmbed(config, shard, dtype)
        self.decoder_layer = nn.ModuleList(DecoderLayer(config, shard, dtype, int8, expert_dtype)
                                           for _ in range(config.num_layers))
        self.rms_norm = RMSNorm(config.emb_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config.key_size, config.rope_base, config.max_seq_len)
        self.attention_workspace = AttentionWorkspace()
        self.packed_lm_head: torch.Tensor | None = None
        # Tokens routed to each (layer, expert), accumulated on the device; readers reset it.
        self.register_buffer("expert_counts", torch.zeros(config.num_layers, config.num_experts,
                                                          dtype=torch.int64), persistent=False)

    def store_experts_out_in(self) -> None:
        """Re-stores every float expert weight in nn.Linear's [out, in] order, keeping its [in, out]
        view (so names, shapes and the kernels' contract do not change). On CPU torch's GEMM and GEMV
        kernels read K contiguously: this order is faster at every batch size measured, in bfloat16
        up to 1.8x at batch 1 (docs/benchmarks.md, "MoE layer kernels"). int8 weights stay as loaded."""
        for layer in self.decoder_layer:
            for linear in (layer.moe.linear_linear_v, layer.moe.linear_1):
                if linear.w.dtype != torch.int8:
                    linear.w = linear.w.transpose(1, 2).contiguous().transpose(1, 2)

    def pack_for_cpu(self) -> None:
        """Lays every float32 weight (and bfloat16 one, where the CPU has native bfloat16) out once more
        for oneDNN's CPU GEMM (kernels.cpu_packing): the attention projections, the experts and the
        tied LM head, float32 used from 2 rows on, bfloat16 from one. float32 single rows
        read the originals, the attention projections re-stored [out, in] under their [in, out] view
        as the experts are (store_experts_out_in). Names, shapes and every other path are unchanged;
        packed weights take twice their memory on CPU."""
        for layer in self.decoder_layer:
            attn = layer.multi_head_attention
            for linear in (attn.query, attn.key, attn.value, attn.linear):
                if linear.scales is None and pack_weight(linear.w[:1]) is not None:
                    linear.w = linear.w.t().contiguous().t()
                    linear.packed = pack_weight(linear.w)
            for linear in (layer.moe.linear_linear_v, layer.moe.linear_1):
                # Experts stored apart from the compute dtype (expert_dtype) keep the widening path.
                if linear.w.dtype == self.dtype and pack_weight(linear.w[0, :1]) is not None:
                    linear.packed = tuple(pack_weight(w) for w in linear.w)
        self.packed_lm_head = pack_weight(self.in_out_embed.embeddings.T)

    def use_moe_backend(self, backend: str) -> None:
        """Pins every MoE layer to one of kernels.dispatch.MOE_BACKENDS (default auto)."""
        if backend not in MOE_BACKENDS:
            raise ValueError(f"MoE backend must be one of {MOE_BACKENDS}, got {backend!r}")
        for layer in self.decoder_layer:
            layer.moe.backend = backend

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_kv_heads // self.shard.size

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.num_layers, self.num_kv_heads, num_blocks, block_size, self.config.key_size)
        device = self.in_out_embed.embeddings.device
        return (torch.zeros(shape, dtype=self.dtype, device=device),
                torch.zeros(shape, dtype=self.dtype, device=device))  # K, V: [L, K, N, S, Dh]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.in_out_embed.embeddings
        if self.shard.size == 1:
            x = table[input_ids]
        else:
            local = input_ids - self.in_out_embed.first_row
            held = (local >= 0) & (local < table.shape[0])
            x = self.comm.all_reduce(table[local.clamp(0, table.shape[0] - 1)] * held[:, None])
        return x.to(self.residual_dtype) * self.config.embedding_multiplier_scale  # [T, D]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                count_experts: bool = True) -> torch.Tensor:
        """input_ids, positions: [T]; returns the final hidden states [T, D] (before the output norm)."""
        device = self.in_out_embed.embeddings.device
        if meta is not None:  # None: an embedder's own attention (the vLLM plugin) brings its metadata
            meta = meta.to(device)
        h = self.embed(input_ids.to(device))
        positions = positions.to(device)
        k_cache, v_cache = kv_cache
        for i, layer in enumerate(self.decoder_layer):
            counts = self.expert_counts[i] if count_experts else None
            h = layer(h, positions, self.rope, self.comm, k_cache[i], v_cache[i], meta, counts,
                      self.attention_workspace)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, D] -> float32 logits [S, V] (tied output embedding, output multiplier)."""
        h = self.rms_norm(hidden, self.dtype)
        local = dense_matmul(h, self.in_out_embed.embeddings.to(h.dtype).T, self.packed_lm_head)  # [S, V_l]
        logits = self.comm.all_gather(local, dim=-1)
        return (logits * self.config.output_multiplier_scale).float()

    @torch.inference_mode()
    def score(self, token_ids, chunk_size: int | None = None) -> np.ndarray:
        """float32 logits [len, V] at every position of one sequence, prefilled in chunks (default: one)."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        n = int(ids.shape[0])
        if n == 0 or n > self.config.max_seq_len:
            raise ValueError(f"score needs 1..{self.config.max_seq_len} tokens, got {n}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        block_size = 16
        num_blocks = -(-n // block_size)
        kv = self.allocate_kv_cache(num_blocks, block_size)
        table = torch.arange(num_blocks)
        step = chunk_size or n
        out = []
        for start in range(0, n, step):
            end = min(n, start + step)
            meta = AttentionMetadata.for_single_sequence(start, end - start, table, block_size)
            hidden = self.forward(ids[start:end], torch.arange(start, end), kv, meta, count_experts=False)
            out.append(self.compute_logits(hidden))
        return torch.cat(out).cpu().numpy()

    @torch.inference_mode()
    def generate(self, prompt_ids, max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop_token_ids=()) -> list[int]:
        """One sequence with the KV cache: the prompt in one prefill, then one token per step.

        Greedy at temperature 0 (ties to the lowest id), else plain temperature sampling; the serving
        engine (services.engine) adds batching and the full sampler."""
        ids = [int(t) for t in prompt_ids]
        total = len(ids) + max_tokens
        if not ids or max_tokens < 1 or total > self.config.max_seq_len:
            raise ValueError(f"need a prompt and prompt + max_tokens <= {self.config.max_seq_len}")
        block_size = 16
        num_blocks = -(-total // block_size)
        kv, table = self.allocate_kv_cache(num_blocks, block_size), torch.arange(num_blocks)
        generator = torch.Generator().manual_seed(seed)
        out: list[int] = []
        start, pending = 0, ids
        while len(out) < max_tokens:
            meta = AttentionMetadata.for_single_sequence(start, len(pending), table, block_size)
            hidden = self.forward(torch.tensor(pending), torch.arange(start, start + len(pending)), kv, meta,
                                  count_experts=False)
            logits = self.compute_logits(hidden[-1:])[0]  # [V]
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=generator))  # a CPU generator
            out.append(token)
            if token in stop_token_ids:
                break
            start, pending = start + len(pending), [token]
        return out
