"""Batched next-token sampling with per-request options.

Order of operations for each row (the vLLM / OpenAI semantics):
  1. logprobs are read from log_softmax of the RAW logits (before penalties, masks and temperature),
     like vLLM's default: they describe the model, not the sampling transform.
  2. min_tokens: eos (unless ignore_eos) and stop_token_ids are masked while too few tokens exist.
  2b. logit_bias: each listed token's bias is added to its logit (vLLM applies it at this point too),
     so it steers greedy picks and sampling alike, but not the reported logprobs (step 1).
  2c. structured outputs: each constrained row's grammar matcher fills a token bitmask, and the masks
     of all constrained rows are applied to the logits in one step (unconstrained batches skip this);
     after the bias, so no bias can make a token the grammar forbids possible.
  3. penalties: repetition (prompt + output tokens: positive logits divided by it, negative ones
     multiplied), then frequency (minus f * count) and presence (minus p if present) over output tokens.
  4. greedy rows (temperature ~ 0) take the argmax here (ties -> lowest token id).
  5. temperature, then top-k, top-p (on the top-k renormalised distribution) and min-p (tokens below
     min_p * the top probability) -- one sort for the whole batch.
  6. a sample via the Gumbel-max trick, argmax(logits + Gumbel noise), which needs no cumsum search.

Seeds: a seeded row draws its noise from a generator seeded with a mix of (seed, number of tokens
generated so far), so its tokens depend on nothing else in the batch, survive preemption and need no
per-sequence state to clean up. Unseeded rows share the sampler's generator.

Legend: B rows (sequences needing a token), V vocabulary size, L longest token history.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from services.engine.sampling_params import SamplingParams
from services.engine.sequence import PromptLogprob, Sequence, TopLogprobs

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """Generator seed for the `step`-th token of a seeded sequence; mixed so that nearby seeds and
    steps (seed + index for n > 1 siblings) give unrelated streams."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [B]
    # The sampled token's raw logprob; None for rows that did not ask for logprobs.
    logprobs: list[float | None]
    # The row's `logprobs` most likely tokens (id, raw logprob), most likely first; None as above.
    top_logprobs: list[TopLogprobs | None]


def _token_counts(token_ids: Seq[Seq[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32: how often each token occurs in each row's list."""
    longest = max((len(t) for t in token_ids), default=0)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.float32, device=device)
    if longest:
        # Padding points at an extra column that is dropped afterwards.
        padded = torch.tensor([list(t) + [vocab_size] * (longest - len(t)) for t in token_ids],
                              dtype=torch.int64, device=device)  # [B, L]
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, output_token_ids: Seq[Seq[int]],
                    prompt_token_ids: Seq[Seq[int]], presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; presence, frequency, repetition [B]. Returns the penalised logits [B, V]."""
    _, vocab = logits.shape
    counts = _token_counts(output_token_ids, vocab, logits.device)  # [B, V]
    seen = (_token_counts(prompt_token_ids, vocab, logits.device) > 0) | (counts > 0)  # [B, V]
    rep = repetition[:, None]  # [B, 1]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_logit_bias(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """logits [B, V] plus each row's logit_bias, in one scatter; ids beyond V are ignored (front ends
    reject them against the vocabulary)."""
    vocab = logits.shape[1]
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if t < vocab]
    if not entries:
        return logits
    rows, cols, values = zip(*entries)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(values, dtype=logits.dtype, device=logits.device),
                            accumulate=True)


def prompt_logprobs(logits: torch.Tensor, targets: Seq[int], top_n: int) -> list[PromptLogprob]:
    """logits [P, V] of prompt rows; targets [P] the prompt token each row predicts. Raw logprobs
    (no sampling transform), like the sampled tokens' logprobs."""
    logprobs = logits.float().log_softmax(dim=-1)  # [P, V]
    ids = torch.tensor(list(targets), dtype=torch.int64, device=logits.device)[:, None]  # [P, 1]
    chosen = logprobs.gather(1, ids)  # [P, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    top: list[TopLogprobs] = [[] for _ in ranks]
    top_n = min(top_n, logits.shape[1])
    if top_n:
        values, top_ids = logprobs.topk(top_n, dim=-1)  # [P, top_n] each
        top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
    return [PromptLogprob(lp, rank, t) for lp, rank, t in zip(chosen[:, 0].tolist(), ranks, top)]


_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; rows [C] the constrained rows; bitmask [C, ceil(V / 32)] int32 (CPU), bit j of
    word w set when token 32 w + j is allowed. Returns logits with the disallowed tokens of those rows
    at -inf, in one masked_fill over the batch (unconstrained rows get an all-ones mask): selecting
    rows of [B, V] with index_select or advanced indexing costs far more on CPU than the mask."""
    batch, vocab = logits.shape
    words = torch.full((batch, bitmask.shape[1]), -1, dtype=torch.int32)
    words.index_copy_(0, rows.cpu(), bitmask)
    # Little-endian words: byte k of word w holds tokens 32 w + 8 k .. 32 w + 8 k + 7, lowest bit first.
    octets = words.to(logits.device).view(torch.uint8)  # [B, 4 W]
    allowed = (octets[:, :, None] & _BITS.to(logits.device)).ne(0).reshape(batch, -1)[:, :vocab]  # [B, V]
    return logits.masked_fill(~allowed, float("-inf"))


class GrammarMasks:
    """Fills the token bitmasks of many grammar matchers at once, on llguidance's own thread pool."""

    def __init__(self) -> None:
        self._executor = None

    def __call__(self, matchers: Seq[Any], vocab_size: int) -> torch.Tensor:
        """[len(matchers), ceil(vocab_size / 32)] int32 bitmask, row i for matchers[i]."""
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        words = (vocab_size + 31) // 32
        bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                               bitmask.data_ptr(), words * 4, len(matchers))
        return bitmask


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude. logits [B, V] (temperature applied);
    top_k [B] int64 (V = off), top_p [B] float (1 = off), min_p [B] float (0 = off)."""
    vocab = logits.shape[1]
    # stable: ties at a top-k boundary keep the lower token ids, deterministically.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V] each
    ranks = torch.arange(vocab, device=logits.device)  # [V]
    mask = ranks[None, :] >= top_k[:, None]  # [B, V]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    # Probability mass strictly before each token; the top token always stays (0 < top_p).
    before = probs.cumsum(dim=-1) - probs
    # top_p == 1 disables the filter outright: rounding in the cumsum must not drop the tail.
    threshold = torch.where(top_p >= 1, torch.full_like(top_p, float("inf")), top_p)
    mask |= before >= threshold[:, None]
    mask |= probs < (min_p[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """min-p alone needs no sort. logits [B, V]; min_p [B]."""
    probs = logits.softmax(dim=-1)  # [B, V]
    keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


class Sampler:
    """Call with the logits of the rows that need a token. `generator` drives unseeded rows (it must
    live on the logits' device); without one, a generator seeded from `seed` is made per device."""

    def __init__(self, generator: torch.Generator | None = None, *, seed: int | None = None) -> None:
        self._generator = generator
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._grammar_masks = GrammarMasks()

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is not None:
            return self._generator
        if device not in self._generators:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed & _MASK64)
            self._generators[device] = gen
        return self._generators[device]

    def sample_sequences(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        """Sample for `seqs` (row i of logits [B, V] belongs to seqs[i])."""
        return self(logits, [s.sampling_params for s in seqs], [s.output_token_ids for s in seqs],
                    prompt_token_ids=[s.prompt_token_ids for s in seqs], seeds=[s.seed for s in seqs],
                    eos_token_ids=[s.eos_token_id for s in seqs], grammars=[s.grammar for s in seqs])

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, params: Seq[SamplingParams],
                 output_token_ids: Seq[Seq[int]], *, prompt_token_ids: Seq[Seq[int]] | None = None,
                 seeds: Seq[int | None] | None = None,
                 eos_token_ids: Seq[int | None] | None = None,
                 grammars: Seq[Any | None] | None = None) -> SamplerOutput:
        """logits [B, V]. output_token_ids: each row's generated tokens (penalties, min_tokens and the
        seeded step). prompt_token_ids: for the repetition penalty (outputs only when omitted).
        seeds: per-row seeds (default params[i].seed). eos_token_ids: masked under min_tokens.
        grammars: per-row structured-output matchers (None: unconstrained); read, not advanced."""
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(output_token_ids) != len(params):
            raise ValueError(f"logits {tuple(logits.shape)} must be [B, V] with B = {len(params)} "
                             f"params and {len(output_token_ids)} token histories")
        batch = logits.shape[0]
        device = logits.device
        if seeds is None:
            seeds = [p.seed for p in params]
        raw = logits.float()  # [B, V]

        logits = self._mask_min_tokens(raw, params, output_token_ids, eos_token_ids)
        logits = apply_logit_bias(logits, params)
        constrained = [i for i, g in enumerate(grammars or ()) if g is not None]
        if constrained:
            bitmask = self._grammar_masks([grammars[i] for i in constrained], logits.shape[1])
            rows = torch.tensor(constrained, dtype=torch.int64)
            logits = apply_token_bitmask(logits, rows, bitmask)
        if any(p.has_penalties for p in params):
            # Rows without penalties contribute empty histories, so they cost no padding.
            outs = [o if p.has_penalties else () for p, o in zip(params, output_token_ids)]
            prompts = [pr if p.has_penalties and p.repetition_penalty != 1 else ()
                       for p, pr in zip(params, prompt_token_ids or [()] * batch)]
            logits = apply_penalties(
                logits, outs, prompts,
                torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
                torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
                torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device))

        greedy = [p.greedy for p in params]
        tokens = logits.argmax(dim=-1)  # [B]; the first maximum, i.e. the lowest id on ties
        if not all(greedy):
            sampled = self._sample(logits, params, output_token_ids, seeds, greedy)
            tokens = torch.where(torch.tensor(greedy, device=device), tokens, sampled)
        return self._output(raw, tokens, params)

    @staticmethod
    def _mask_min_tokens(logits: torch.Tensor, params: Seq[SamplingParams],
                         output_token_ids: Seq[Seq[int]],
                         eos_token_ids: Seq[int | None] | None) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        vocab = logits.shape[1]
        for i, (p, out) in enumerate(zip(params, output_token_ids)):
            if len(out) >= p.min_tokens:
                continue
            stops = list(p.stop_token_ids)
            eos = None if eos_token_ids is None else eos_token_ids[i]
            if eos is not None and not p.ignore_eos:
                stops.append(eos)
            for t in stops:
                if t < vocab:
                    rows.append(i)
                    cols.append(t)
        if not rows:
            return logits
        logits = logits.clone()
        logits[rows, cols] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, params: Seq[SamplingParams], output_token_ids: Seq[Seq[int]],
                seeds: Seq[int | None], greedy: list[bool]) -> torch.Tensor:
        vocab = logits.shape[1]
        device = logits.device
        # Greedy rows are sampled too (and discarded) so the batch stays one tensor: temperature 1.
        temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                   dtype=torch.float32, device=device)
        logits = logits / temperature[:, None]
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        if any(p.uses_top_k or p.top_p < 1 for p in params):
            top_k = torch.tensor([p.top_k if p.uses_top_k else vocab for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            logits = filter_logits(logits, top_k, top_p, min_p)
        elif any(p.min_p > 0 for p in params):
            logits = filter_min_p(logits, min_p)

        # Exp(1) noise; -log of it is Gumbel noise. Clamped: a zero draw would make an infinite score.
        noise = torch.empty_like(logits).exponential_(generator=self._shared_generator(device))  # [B, V]
        for i, seed in enumerate(seeds):
            if seed is not None and not greedy[i]:
                gen = torch.Generator(device=device)
                gen.manual_seed(step_seed(seed, len(output_token_ids[i])))
                noise[i].exponential_(generator=gen)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (logits - noise.log()).argmax(dim=-1)  # [B]

    @staticmethod
    def _output(raw: torch.Tensor, tokens: torch.Tensor, params: Seq[SamplingParams]) -> SamplerOutput:
        token_list = tokens.tolist()
        wanted = [p.logprobs for p in params]
        if all(n is None for n in wanted):
            return SamplerOutput(token_list, [None] * len(params), [None] * len(params))
        logprobs = raw.log_softmax(dim=-1)  # [B, V]
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        top_n = min(max(n for n in wanted if n is not None), raw.shape[1])
        if top_n:
            top_values, top_ids = logprobs.topk(top_n, dim=-1)  # [B, top_n] each
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        out_lp: list[float | None] = []
        out_top: list[TopLogprobs | None] = []
        for i, n in enumerate(wanted):
            if n is None:
                out_lp.append(None)
                out_top.append(None)
            else:
                out_lp.append(chosen[i])
                out_top.append(list(zip(top_ids[i][:n], top_values[i][:n])) if n else [])
        return SamplerOutput(token_list, out_lp, out_top)
