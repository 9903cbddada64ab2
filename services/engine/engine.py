"""The synchronous engine core: requests in, one step at a time (schedule -> execute -> update -> emit)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from services.engine.api import ModelInfo, RequestRejected, admit
from services.engine.config import EngineConfig
from services.engine.kv_cache import BlockManager, num_kv_blocks
from services.engine.outputs import CompletionOutput, RequestOutput, Usage
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler, prompt_logprobs
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.engine.sequence import Sequence
from services.engine.stats import EngineStats
from services.engine.structured_output import GrammarCompiler
from services.engine.text_stream import TextStream
from services.model.checkpoint import load_model
from services.model.grok1 import Grok1
from services.model.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer


@dataclass
class _SeqText:
    stream: TextStream
    emitted_tokens: int = 0
    emitted_logprobs: int = 0


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[_SeqText]
    reported_finished: set[int] = field(default_factory=set)
    prompt_logprobs_sent: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig, model: Grok1 | None = None,
                 tokenizer: Tokenizer | None = None):
        self.config = config
        self.group = self._start_group(model)
        if self.group is not None:
            self.model = self.group.model  # rank 0's shard
        else:
            self.model = model if model is not None else self._load_model()
        mc = self.model.config
        model_dir = Path(config.model) if Path(config.model).is_dir() else None
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir, mc.vocab_size)
        self.max_model_len = config.context_length(mc.max_seq_len)
        self.model_info = ModelInfo(str(config.model), self.max_model_len, mc.vocab_size, mc.num_layers,
                                    mc.num_experts, int(time.time()))
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len, config.max_overtakes), self.block_manager)
        self.sampler = Sampler(seed=config.seed)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size)
        self.stats = EngineStats(mc.num_layers, mc.num_experts)
        self.runner = self._make_runner(num_blocks)
        self._requests: dict[str, _Request] = {}
        self._seq_owner: dict[int, str] = {}
        self._seq_ids = itertools.count()

    def _start_group(self, model: Grok1 | None):
        """The parallel group (ranks 1..N-1 as Ray actors, rank 0 here), or None for one rank."""
        if self.config.parallel_size == 1:
            return None
        if model is not None:
            raise ValueError("with parallel_size > 1 every rank loads its own shard: pass no model")
        from services.engine.parallel_runner import ParallelGroup

        return ParallelGroup.start(self.config)

    def _load_model(self) -> Grok1:
        c = self.config
        return load_model(c.model, c.dtype, load_format=c.load_format, seed=c.seed, device=c.device,
                          expert_dtype=c.expert_dtype)

    def _num_kv_blocks(self) -> int:
        config, mc = self.config, self.model.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        return num_kv_blocks(config.kv_cache_memory_bytes, num_layers=mc.num_layers,
                             num_kv_heads=self.model.num_kv_heads, head_size=mc.key_size,
                             block_size=config.block_size,
                             dtype_bytes=torch.empty((), dtype=self.model.dtype).element_size())

    def _make_runner(self, num_blocks: int) -> ModelRunner:
        if self.group is None:
            return ModelRunner(self.model, num_blocks, self.config.block_size)
        from services.engine.parallel_runner import ParallelRunner

        # It feeds the statistics with each step's collective time.
        return ParallelRunner(self.group, num_blocks, self.config.block_size, self.stats)

    # --- requests ----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise RequestRejected for a request that can never be served (nothing is queued)."""
        rejection = admit(prompt_token_ids, params.max_tokens, vocab_size=self.model_info.vocab_size,
                          max_model_len=self.max_model_len)
        if rejection is not None:
            raise RequestRejected(rejection)

    def compile_grammar(self, params: SamplingParams):
        """The structured-output matcher for `params` (None when unconstrained); RequestRejected when
        the constraint cannot be compiled. Thread-safe: front ends call it at admission, off the loop."""
        if params.structured_output is None:
            return None
        return self.grammars.compile(params.structured_output)

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    arrival_time: float | None = None, grammar=None) -> None:
        """`grammar`: the matcher compile_grammar returned for these params, compiled here if None."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        if grammar is None:
            grammar = self.compile_grammar(params)
        prompt = [int(t) for t in prompt_token_ids]
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs, texts = [], []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, prompt, params, index=index,
                           eos_token_id=self.model.config.eos_token_id, arrival_time=arrival)
            if grammar is not None:
                seq.grammar = grammar if index == 0 else grammar.deep_copy()
            seqs.append(seq)
            detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt_ids=prompt)
            texts.append(_SeqText(TextStream(detokenizer, params.stop)))
        self._requests[request_id] = _Request(request_id, prompt, params, seqs, texts)
        for seq in seqs:
            self._seq_owner[seq.seq_id] = request_id
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        if request_id not in self._requests:
            return False
        aborted = self.scheduler.abort_request(request_id)
        self.stats.record_abort(len(aborted))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # --- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        touched = {self._seq_owner[i] for i in scheduled.finished_seq_ids if i in self._seq_owner}
        forward_s = 0.0
        if not scheduled.is_empty:
            logits = self.runner.execute(scheduled)
            forward_s = self.runner.last_forward_s
            touched |= self._update(scheduled, logits)
        outputs = self._emit(touched)
        self.stats.record_step(scheduled, self.model.expert_counts, forward_s,
                               time.perf_counter() - started, self.block_manager)
        return outputs

    def _update(self, scheduled: SchedulerOutput, logits: torch.Tensor) -> set[str]:
        """Sample the next tokens and hand them to the scheduler; returns the requests they belong to."""
        seqs = [s.seq for s in scheduled.sampled]
        rows = scheduled.prompt_logprob_rows()
        if rows:
            self._record_prompt_logprobs(rows, logits[len(seqs):])
            logits = logits[:len(seqs)]
        sampled = self.sampler.sample_sequences(logits, seqs)
        want_logprobs = any(s.sampling_params.logprobs is not None for s in seqs)
        constrained = [(s, s.num_output_tokens) for s in seqs if s.grammar is not None]
        self.scheduler.update(scheduled, sampled.token_ids,
                              sampled.logprobs if want_logprobs else None,
                              sampled.top_logprobs if want_logprobs else None)
        for seq, before in constrained:
            self._advance_grammar(seq, before)
        return {s.request_id for s in seqs}

    def _advance_grammar(self, seq: Sequence, outputs_before: int) -> None:
        """Feed the token just appended (if any: a sequence aborted during the step gets none) to the
        sequence's matcher, and end the sequence once the grammar is complete."""
        if seq.num_output_tokens == outputs_before:
            return
        matcher = seq.grammar
        ok = matcher.consume_token(seq.last_token_id)
        if seq.is_finished:
            return
        # Not ok only if a token outside the mask was sampled, which the mask rules out; ending the
        # sequence there keeps a broken matcher from masking every token afterwards.
        if not ok or matcher.is_stopped():
            self.scheduler.finish(seq.seq_id, "stop")

    @staticmethod
    def _record_prompt_logprobs(rows, logits: torch.Tensor) -> None:
        """logits [P, V]: the rows of SchedulerOutput.prompt_logprob_rows, in order."""
        targets = [entry.seq.prompt_token_ids[q + 1 + k] for entry, _, q, count in rows for k in range(count)]
        top_n = max(entry.seq.sampling_params.prompt_logprobs for entry, *_ in rows)
        results = prompt_logprobs(logits, targets, top_n)
        offset = 0
        for entry, _, _, count in rows:
            n = entry.seq.sampling_params.prompt_logprobs
            entry.seq.prompt_logprobs.extend(
                replace(r, top=r.top[:n]) if len(r.top) > n else r for r in results[offset:offset + count])
            offset += count

    def _emit(self, touched: set[str]) -> list[RequestOutput]:
        outputs = [out for rid in sorted(touched) if (out := self._postprocess(rid)) is not None]
        # Requests aborted between steps still owe their callers a final output.
        outputs += [out for rid in list(self._requests) if rid not in touched
                    and all(s.is_finished for s in self._requests[rid].seqs)
                    and (out := self._postprocess(rid)) is not None]
        return outputs

    def _postprocess(self, request_id: str) -> RequestOutput | None:
        request = self._requests.get(request_id)
        if request is None:
            return None
        params = request.params
        outputs = []
        for seq, text in zip(request.seqs, request.texts):
            new_tokens = seq.output_token_ids[text.emitted_tokens:]
            if new_tokens:
                stop = text.stream.add(new_tokens, check_stop=not seq.is_finished)
                if stop is not None:
                    self.scheduler.finish(seq.seq_id, "stop", stop)
            out = CompletionOutput(seq.index, list(new_tokens), text.stream.emit(seq.is_finished))
            if params.logprobs is not None:
                out.logprobs = seq.output_logprobs[text.emitted_logprobs:]
                out.top_logprobs = seq.output_top_logprobs[text.emitted_logprobs:]
                text.emitted_logprobs = len(seq.output_logprobs)
            text.emitted_tokens = len(seq.output_token_ids)
            if seq.is_finished and seq.seq_id not in request.reported_finished:
                request.reported_finished.add(seq.seq_id)
                out.finish_reason, out.stop_reason = seq.finish_reason, seq.stop_reason
                self.stats.record_finished(seq)
            elif not new_tokens and not out.text:
                continue
            outputs.append(out)
        finished = all(s.is_finished for s in request.seqs)
        if finished:
            del self._requests[request_id]
            for seq in request.seqs:
                self._seq_owner.pop(seq.seq_id, None)
        if not outputs and not finished:
            return None
        first = request.seqs[0]
        prompt_lps = None
        if (params.prompt_logprobs is not None and not request.prompt_logprobs_sent
                and not first.needs_prompt_logprobs):
            request.prompt_logprobs_sent = True
            prompt_lps = [None, *first.prompt_logprobs]
        usage = Usage(len(request.prompt_token_ids), sum(s.num_output_tokens for s in request.seqs),
                      first.num_cached_tokens)
        metrics = {}
        if first.first_scheduled_time is not None:
            metrics["queue_s"] = first.first_scheduled_time - first.arrival_time
        if first.first_token_time is not None:
            metrics["ttft_s"] = first.first_token_time - first.arrival_time
        return RequestOutput(request_id, request.prompt_token_ids, outputs, finished, usage, metrics,
                             prompt_lps)

    # --- statistics ------------------------------------------------------------------------------
    def metrics_snapshot(self, replica: str) -> dict[str, Any]:
        """The snapshot services.engine.api.EngineClient.metrics_snapshot describes. Call it where no
        step runs at the same time; it drains the histogram samples."""
        stats, blocks = self.stats, self.block_manager
        return {
            "replica": replica,
            "time": time.time(),
            "counters": {
                "preemptions": stats.preemptions, "prefix_cache_queries": blocks.prefix_cache_queries,
                "prefix_cache_hits": blocks.prefix_cache_hits, "prompt_tokens": stats.prompt_tokens,
                "generation_tokens": stats.generation_tokens, "aborts": stats.aborts,
                "step_seconds": stats.step_s_total, "forward_seconds": stats.forward_s_total,
                "collective_seconds": stats.collective_s_total,
                "step_broadcast_seconds": stats.step_broadcast_s_total,
            },
            "rank_expert_tokens": list(stats.rank_expert_tokens),
            "finished": dict(stats.finished_by_reason),
            "gauges": {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                       "kv_usage": blocks.usage},
            "expert_tokens": [list(row) for row in stats.expert_tokens],
            "samples": stats.histogram_states(),
        }
