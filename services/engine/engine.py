"""The synchronous engine core: requests in, one step at a time (schedule -> run -> postprocess)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.kv_cache import BlockManager, num_kv_blocks
from services.engine.outputs import CompletionOutput, RequestOutput, Usage
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.sequence import Sequence
from services.engine.stats import EngineStats
from services.engine.text_stream import TextStream
from services.model import load_model
from services.model.grok1 import Grok1
from services.model.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer


def check_request(prompt_token_ids: Seq[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError for a request no engine can serve: the same rules for every engine backend."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    bad = next((t for t in prompt_token_ids if not 0 <= int(t) < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    wanted = n + (params.max_tokens or 1)
    if wanted > max_model_len:
        raise ValueError(f"this model's maximum context length is {max_model_len} tokens; the "
                         f"request has {n} prompt tokens and asks for {params.max_tokens or 1} more")


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


class LLMEngine:
    def __init__(self, config: EngineConfig, model: Grok1 | None = None,
                 tokenizer: Tokenizer | None = None):
        self.config = config
        # --- model and runner (parallel groups: services/engine/parallel.py) ---
        self.group = None
        if config.parallel_size > 1:
            if model is not None:
                raise ValueError("with parallel_size > 1 every rank loads its own shard: pass no model")
            from services.engine.parallel import ParallelGroup
            self.group = ParallelGroup.start(config)  # ranks 1..N-1 as Ray actors; rank 0's shard here
            self.model = self.group.model
        else:
            self.model = model if model is not None else load_model(
                config.model, config.dtype, load_format=config.load_format, seed=config.seed,
                device=config.device)
        # --- end model ---
        mc = self.model.config
        model_dir = Path(config.model) if Path(config.model).is_dir() else None
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir, mc.vocab_size)
        self.max_model_len = config.context_length(mc.max_seq_len)
        num_blocks = config.num_kv_blocks or num_kv_blocks(
            config.kv_cache_memory_bytes, num_layers=mc.num_layers, num_kv_heads=self.model.num_kv_heads,
            head_size=mc.key_size, block_size=config.block_size,
            dtype_bytes=torch.empty((), dtype=self.model.dtype).element_size())
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len), self.block_manager)
        self.sampler = Sampler(seed=config.seed)
        self.stats = EngineStats(mc.num_layers, mc.num_experts)
        # --- runner: after the stats, which a parallel runner feeds with collective time ---
        if self.group is None:
            self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        else:
            from services.engine.parallel_runner import ParallelRunner
            self.runner = ParallelRunner(self.group, num_blocks, config.block_size, self.stats)
        # --- end runner ---
        self._requests: dict[str, _Request] = {}
        self._seq_owner: dict[int, str] = {}
        self._seq_ids = itertools.count()

    # --- requests ----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that can never be served (nothing is queued)."""
        check_request(prompt_token_ids, params, self.model.config.vocab_size, self.max_model_len)

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        prompt = [int(t) for t in prompt_token_ids]
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs, texts = [], []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, prompt, params, index=index,
                           eos_token_id=self.model.config.eos_token_id, arrival_time=arrival)
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
            seqs = [s.seq for s in scheduled.sampled]
            sampled = self.sampler.sample_sequences(logits, seqs)
            want_logprobs = any(s.sampling_params.logprobs is not None for s in seqs)
            self.scheduler.update(scheduled, sampled.token_ids,
                                  sampled.logprobs if want_logprobs else None,
                                  sampled.top_logprobs if want_logprobs else None)
            touched |= {s.request_id for s in seqs}
        outputs = [out for rid in sorted(touched) if (out := self._postprocess(rid)) is not None]
        # Requests aborted between steps still owe their callers a final output.
        outputs += [out for rid in list(self._requests) if rid not in touched
                    and all(s.is_finished for s in self._requests[rid].seqs)
                    and (out := self._postprocess(rid)) is not None]
        self.stats.record_step(scheduled, self.model.expert_counts, forward_s,
                               time.perf_counter() - started, self.block_manager)
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
        usage = Usage(len(request.prompt_token_ids), sum(s.num_output_tokens for s in request.seqs),
                      first.num_cached_tokens)
        metrics = {}
        if first.first_scheduled_time is not None:
            metrics["queue_s"] = first.first_scheduled_time - first.arrival_time
        if first.first_token_time is not None:
            metrics["ttft_s"] = first.first_token_time - first.arrival_time
        return RequestOutput(request_id, request.prompt_token_ids, outputs, finished, usage, metrics)
