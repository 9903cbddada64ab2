"""The engine (continuous batching, chunked prefill, preemption, prefix cache) against the golden tokens."""
from __future__ import annotations

import numpy as np
import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from tests.conftest import golden_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def run_all(engine: LLMEngine, requests: dict[str, list[int]], stagger: int = 0) -> dict[str, list]:
    """Submit requests (one more every `stagger` steps when > 0) and collect tokens and logprobs."""
    tokens = {r: [] for r in requests}
    logprobs = {r: [] for r in requests}
    pending = list(requests.items())
    steps = 0
    while pending or engine.has_unfinished():
        if pending and (stagger == 0 or steps % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for rid, ids in batch:
                engine.add_request(rid, ids, GREEDY)
            pending = pending[len(batch):]
        for out in engine.step():
            engine.scheduler.check_invariants()
            for o in out.outputs:
                tokens[out.request_id] += o.token_ids
                logprobs[out.request_id] += o.logprobs or []
        steps += 1
    return {"tokens": tokens, "logprobs": logprobs}


def check(result, golden, model, prompts: dict[str, int]) -> None:
    for rid, j in prompts.items():
        expected = golden[f"greedy_{j}"].tolist()
        assert result["tokens"][rid] == expected, f"{rid}: tokens differ from the reference"
        # Chosen-token logprobs: the first against the golden logits, all against a full rescoring.
        first = log_softmax(golden[f"logits_{j}"][-1])[expected[0]]
        assert abs(result["logprobs"][rid][0] - first) <= 1e-3
        full = np.concatenate([golden[f"prompt_{j}"], expected[:-1]])
        rescored = log_softmax(model.score(full))[len(golden[f"prompt_{j}"]) - 1:]
        want = rescored[np.arange(len(expected)), expected]
        np.testing.assert_allclose(result["logprobs"][rid], want, atol=1e-3)


def make_engine(model, **options) -> LLMEngine:
    config = EngineConfig(model=str(model.source), **options)
    return LLMEngine(config, model=model)


@pytest.mark.parametrize("chunk, stagger", [(16, 0), (3, 0), (1, 0), (16, 3), (3, 5)])
def test_batched_and_chunked(tiny_model_f32, golden_f32, chunk, stagger):
    engine = make_engine(tiny_model_f32, max_num_batched_tokens=chunk, max_num_seqs=min(chunk, 4))
    prompts = {f"r{j}": j for j in golden_prompts(golden_f32)}
    result = run_all(engine, {r: golden_f32[f"prompt_{j}"].tolist() for r, j in prompts.items()}, stagger)
    check(result, golden_f32, tiny_model_f32, prompts)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_under_a_tiny_kv_budget(tiny_model_f32, golden_f32):
    # 5 blocks of 16 tokens for four sequences of up to 64 tokens: preemption is unavoidable.
    engine = make_engine(tiny_model_f32, num_kv_blocks=5, block_size=16, max_model_len=80,
                         max_num_batched_tokens=32, max_num_seqs=4)
    prompts = {f"r{j}": j for j in golden_prompts(golden_f32)}
    result = run_all(engine, {r: golden_f32[f"prompt_{j}"].tolist() for r, j in prompts.items()})
    assert engine.scheduler.num_preemptions > 0
    check(result, golden_f32, tiny_model_f32, prompts)


def test_prefix_cache_serves_a_shared_prompt(tiny_model_f32, golden_f32):
    engine = make_engine(tiny_model_f32, block_size=8)
    j = max(golden_prompts(golden_f32), key=lambda k: len(golden_f32[f"prompt_{k}"]))
    ids = golden_f32[f"prompt_{j}"].tolist()
    first = run_all(engine, {"a": ids})
    hits_before = engine.block_manager.prefix_cache_hits
    second = run_all(engine, {"b": ids, "c": ids})
    assert engine.block_manager.prefix_cache_hits - hits_before >= 2 * (len(ids) // 8 - 1) * 8
    check(first, golden_f32, tiny_model_f32, {"a": j})
    check(second, golden_f32, tiny_model_f32, {"b": j, "c": j})


def test_offline_llm_api(tiny_reference, golden_f32):
    llm = LLM(str(tiny_reference))
    prompts = [golden_f32[f"prompt_{j}"].tolist() for j in golden_prompts(golden_f32)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for j, out in zip(golden_prompts(golden_f32), outs):
        assert out.outputs[0].token_ids == golden_f32[f"greedy_{j}"].tolist()
        assert out.outputs[0].finish_reason == "length"
        assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == len(prompts[j])
