"""Offline batch API: `LLM(model).generate(prompts, params)` runs the engine until every request is done."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.outputs import CompletionOutput, RequestOutput
from services.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "tiny", **engine_options):
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_options))
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Seq[str] | Seq[Seq[int]] | str,
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Prompts as text or token-id lists; one params for all or one per prompt. Returns one
        RequestOutput per prompt, in order, holding each sequence's whole completion."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params if params is not None else SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt in prompts:
            ids.append(self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt])
        order, merged = [], {}
        for prompt_ids, p in zip(ids, per_prompt):
            request_id = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, prompt_ids, p)
            order.append(request_id)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                merged[out.request_id] = _merge(merged.get(out.request_id), out)
        return [merged[r] for r in order]


def _merge(total: RequestOutput | None, step: RequestOutput) -> RequestOutput:
    if total is None:
        total = dataclasses.replace(step, outputs=[])
    by_index = {o.index: o for o in total.outputs}
    for inc in step.outputs:
        acc = by_index.setdefault(inc.index, CompletionOutput(inc.index, logprobs=None))
        acc.token_ids += inc.token_ids
        acc.text += inc.text
        if inc.logprobs is not None:
            acc.logprobs = (acc.logprobs or []) + inc.logprobs
            acc.top_logprobs = (acc.top_logprobs or []) + (inc.top_logprobs or [])
        acc.finish_reason = inc.finish_reason or acc.finish_reason
        acc.stop_reason = inc.stop_reason if inc.stop_reason is not None else acc.stop_reason
    total.outputs = [by_index[i] for i in sorted(by_index)]
    total.finished, total.usage, total.metrics = step.finished, step.usage, step.metrics
    return total
