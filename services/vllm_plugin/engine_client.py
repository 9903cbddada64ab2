"""The engine client over vLLM's AsyncLLM running Grok-1 through the plugin (`engine.backend: vllm`).

The gateway sees it exactly as the native engine (services.engine.api.EngineClient). vLLM
gets token ids and returns token ids: text, stop strings and EOS are handled here with the model's
own tokenizer (vLLM cannot load SentencePiece), by the same TextStream as the native engine.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from typing import Any

from services.engine.api import EngineDeadError, ModelInfo, Rejection, RequestRejected, admit
from services.engine.config import EngineConfig
from services.engine.outputs import CompletionOutput, RequestOutput, Usage
from services.engine.sampling_params import SamplingParams
from services.engine.text_stream import TextStream
from services.model.checkpoint import resolve_source
from services.model.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from services.vllm_plugin.names import FORMAT


def vllm_sampling_params(params: SamplingParams, eos_token_id: int):
    """Ours -> vLLM's. EOS is a stop token here because vLLM runs without a tokenizer."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    if params.structured_output is not None:
        # vLLM runs here without a tokenizer, and its structured outputs need one.
        raise RequestRejected(Rejection(f"{params.structured_output.param} is not supported with the "
                                        "vLLM engine backend", params.structured_output.param))
    stop_ids = list(params.stop_token_ids)
    if not params.ignore_eos and eos_token_id not in stop_ids:
        stop_ids.append(eos_token_id)
    return VllmSamplingParams(
        n=params.n, temperature=params.temperature, top_p=params.top_p,
        top_k=0 if params.top_k in (-1, 0) else params.top_k, min_p=params.min_p, seed=params.seed,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, max_tokens=params.max_tokens,
        min_tokens=params.min_tokens, stop_token_ids=stop_ids, ignore_eos=params.ignore_eos,
        logprobs=params.logprobs, detokenize=False, output_kind=RequestOutputKind.DELTA,
        logit_bias=dict(params.logit_bias) or None,
    )


def _no_samples() -> dict[str, list[float]]:
    return {"ttft": [], "itl": [], "e2e": []}


class _Seq:
    def __init__(self, stream: TextStream):
        self.stream = stream
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


class VllmEngineClient:
    def __init__(self, config: EngineConfig, replica: str = "local"):
        grok, path, _ = resolve_source(config.model, config.load_format)
        if path is None:
            raise ValueError(f"engine.backend 'vllm' loads a checkpoint directory, and {config.model!r} is a "
                             f"preset: write its weights with `grok-serve convert {config.model} DIR`")
        # vLLM's CPU backend sizes its KV cache from this variable, read when vLLM starts.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, -(-config.kv_cache_memory_bytes // (1 << 30)))))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._max_model_len = config.context_length(grok.max_seq_len)
        args = AsyncEngineArgs(
            model=str(path), config_format=FORMAT, load_format=FORMAT, skip_tokenizer_init=True,
            dtype=config.dtype, seed=config.seed, max_model_len=self._max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            # The plugin's model is not traced by torch.compile nor captured in CUDA graphs.
            enforce_eager=True,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.replica = replica
        self._grok = grok
        self._tokenizer = load_tokenizer(path, grok.vocab_size)
        self._info = ModelInfo(str(config.model), self._max_model_len, grok.vocab_size, grok.num_layers,
                               grok.num_experts, int(time.time()))
        self._counters: Counter[str] = Counter()
        self._finished: Counter[str] = Counter()
        self._samples = _no_samples()
        self._running = 0

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def is_healthy(self) -> bool:
        return not self.engine.errored

    async def generate(self, prompt_ids: Seq[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        rejection = admit(prompt_ids, params.max_tokens, vocab_size=self._info.vocab_size,
                          max_model_len=self._max_model_len)
        if rejection is not None:
            raise RequestRejected(rejection)
        if self.engine.errored:
            raise EngineDeadError(f"the vLLM engine stopped: {self.engine.dead_error!r}")
        prompt = [int(t) for t in prompt_ids]
        seqs = [_Seq(TextStream(IncrementalDetokenizer(self._tokenizer, params.skip_special_tokens,
                                                       prompt_ids=prompt), params.stop))
                for _ in range(params.n)]
        arrival, last_token = time.monotonic(), None
        cached, done, vllm_done = 0, False, False
        self._counters["prompt_tokens"] += len(prompt)
        self._running += 1
        try:
            stream = self.engine.generate(TokensPrompt(prompt_token_ids=prompt),
                                          vllm_sampling_params(params, self._grok.eos_token_id), request_id)
            async for out in stream:
                cached, vllm_done = out.num_cached_tokens or 0, out.finished
                now = time.monotonic()
                if out.outputs and any(c.token_ids for c in out.outputs):
                    self._samples["ttft" if last_token is None else "itl"].append(now - (last_token or arrival))
                    last_token = now
                outputs = [o for c in out.outputs if (o := self._completion(seqs[c.index], c, params)) is not None]
                done = all(s.finish_reason is not None for s in seqs)
                if outputs or done:
                    yield self._request_output(request_id, prompt, seqs, outputs, done, cached, arrival)
                if done:
                    break
        except VllmEngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine stopped: {exc}") from exc
        finally:
            self._running -= 1
            if not done:
                self._counters["aborts"] += 1
            if not vllm_done:
                # A stop string ends sequences that vLLM would continue; a client that left, all of them.
                await self.engine.abort(request_id)

    def _completion(self, seq: _Seq, c, params: SamplingParams) -> CompletionOutput | None:
        if seq.finish_reason is not None:
            return None  # already ended here by a stop string; vLLM's later tokens are dropped
        tokens = list(c.token_ids)
        seq.num_tokens += len(tokens)
        self._counters["generation_tokens"] += len(tokens)
        stop = seq.stream.add(tokens) if tokens else None
        if stop is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif c.finish_reason is not None:
            seq.finish_reason = "length" if c.finish_reason == "length" else "stop"
            seq.stop_reason = c.stop_reason
            if c.stop_reason == self._grok.eos_token_id and c.stop_reason not in params.stop_token_ids:
                seq.stop_reason = None  # EOS, as the native engine reports it
        finished = seq.finish_reason is not None
        out = CompletionOutput(c.index, tokens, seq.stream.emit(finished))
        if params.logprobs is not None and c.logprobs:
            steps = list(c.logprobs)[:len(tokens)]
            out.logprobs = [step[token].logprob for step, token in zip(steps, tokens)]
            out.top_logprobs = [sorted(((t, lp.logprob) for t, lp in step.items() if lp.rank <= params.logprobs),
                                       key=lambda item: -item[1]) for step in steps]
        if finished:  # reported once: a finished sequence returns early above from then on
            out.finish_reason, out.stop_reason = seq.finish_reason, seq.stop_reason
            self._finished[seq.finish_reason] += 1
        elif not tokens and not out.text:
            return None
        return out

    def _request_output(self, request_id: str, prompt: list[int], seqs: list[_Seq],
                        outputs: list[CompletionOutput], finished: bool, cached: int,
                        arrival: float) -> RequestOutput:
        if finished:
            self._samples["e2e"].append(time.monotonic() - arrival)
        usage = Usage(len(prompt), sum(s.num_tokens for s in seqs), cached)
        return RequestOutput(request_id, prompt, outputs, finished, usage)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        try:
            await self.engine.check_health()
        except Exception as exc:
            raise EngineDeadError(f"the vLLM engine stopped: {exc!r}") from exc

    async def metrics_snapshot(self) -> dict[str, Any]:
        samples, self._samples = self._samples, _no_samples()
        return {
            "replica": self.replica, "time": time.time(), "counters": dict(self._counters),
            "finished": dict(self._finished), "gauges": {"running": self._running}, "samples": samples,
        }

    async def shutdown(self) -> None:
        self.engine.shutdown()
