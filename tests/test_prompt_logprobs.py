"""Prompt logprobs (vLLM's `prompt_logprobs`, OpenAI's completions `echo` + `logprobs`) against the
golden per-position logits of the reference checkpoint: in the engine (chunked prefill, batching,
prefix cache, preemption) and through the HTTP API with the openai client."""
from __future__ import annotations

import numpy as np
import openai
import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.gateway.config import AppConfig
from tests.conftest import golden_prompts
from tests.test_gateway_support import LocalServer, reference_tiny_or_skip


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def expected_logprobs(golden, j: int) -> np.ndarray:
    """Logprob of prompt token i + 1 given tokens 0..i, from the golden logits at position i."""
    prompt = golden[f"prompt_{j}"]
    lp = log_softmax(golden[f"logits_{j}"])
    return lp[np.arange(len(prompt) - 1), prompt[1:]]


def run(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list]:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    result: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            engine.scheduler.check_invariants()
            if out.prompt_logprobs is not None:
                assert out.request_id not in result, "prompt logprobs are sent once"
                result[out.request_id] = out.prompt_logprobs
    return result


def make_engine(model, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model.source), **options), model=model)


def check(result, golden, prompts: dict[str, int], top: int) -> None:
    for rid, j in prompts.items():
        got = result[rid]
        assert len(got) == len(golden[f"prompt_{j}"]) and got[0] is None
        np.testing.assert_allclose([g.logprob for g in got[1:]], expected_logprobs(golden, j), atol=1e-3)
        lp = log_softmax(golden[f"logits_{j}"])
        for i, g in enumerate(got[1:]):
            assert len(g.top) == top
            assert g.rank == int((lp[i] > lp[i, golden[f"prompt_{j}"][i + 1]] + 1e-6).sum()) + 1
            if top:
                assert g.top[0][0] == int(lp[i].argmax())


@pytest.mark.parametrize("chunk", [64, 7, 1])
def test_chunked_prefill_and_batching(tiny_model_f32, golden_f32, chunk):
    engine = make_engine(tiny_model_f32, max_num_batched_tokens=chunk, max_num_seqs=min(chunk, 4))
    prompts = {f"r{j}": j for j in golden_prompts(golden_f32)}
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    result = run(engine, {r: golden_f32[f"prompt_{j}"].tolist() for r, j in prompts.items()}, params)
    check(result, golden_f32, prompts, top=2)


def test_prefix_cache_hits_do_not_hide_prompt_rows(tiny_model_f32, golden_f32):
    engine = make_engine(tiny_model_f32, block_size=8)
    j = max(golden_prompts(golden_f32))
    ids = golden_f32[f"prompt_{j}"].tolist()
    run(engine, {"warm": ids}, SamplingParams(temperature=0, max_tokens=1))
    result = run(engine, {"again": ids}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    check(result, golden_f32, {"again": j}, top=0)


def test_preemption_does_not_repeat_prompt_logprobs(tiny_model_f32, golden_f32):
    engine = make_engine(tiny_model_f32, num_kv_blocks=5, block_size=16, max_model_len=80,
                         max_num_batched_tokens=32, max_num_seqs=4)
    prompts = {f"r{j}": j for j in golden_prompts(golden_f32)}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    result = run(engine, {r: golden_f32[f"prompt_{j}"].tolist() for r, j in prompts.items()}, params)
    assert engine.scheduler.num_preemptions > 0
    check(result, golden_f32, prompts, top=1)


def test_requests_without_prompt_logprobs_compute_no_extra_rows(tiny_model_f32, golden_f32):
    engine = make_engine(tiny_model_f32)
    engine.add_request("plain", golden_f32[f"prompt_{max(golden_prompts(golden_f32))}"].tolist(),
                       SamplingParams(temperature=0, max_tokens=1))
    step = engine.scheduler.schedule()
    assert step.prompt_logprob_rows() == [] and step.logits_indices() == step.sample_indices()


def test_prompt_logprobs_is_validated():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


# --- through the HTTP API ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    reference = reference_tiny_or_skip()
    engine = EngineConfig(model=str(reference), dtype="float32", max_num_batched_tokens=16,
                          max_num_seqs=4)
    with (LocalServer(AppConfig(engine=engine, served_model_name="grok-test")) as server,
          openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c):
        yield c


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(reference_tiny_or_skip() / "golden_float32.npz"))


def test_echo_with_logprobs_matches_the_golden_logits(client, golden):
    for j in golden_prompts(golden):
        prompt = golden[f"prompt_{j}"].tolist()
        out = client.completions.create(model="grok-test", prompt=prompt, max_tokens=1, temperature=0,
                                        echo=True, logprobs=1)
        lp = out.choices[0].logprobs
        n = len(prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        np.testing.assert_allclose(lp.token_logprobs[1:n], expected_logprobs(golden, j), atol=1e-3)
        assert len(lp.tokens) == n + 1 and all(len(t) >= 1 for t in lp.top_logprobs[1:])
        assert lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_streamed(client, golden):
    j = max(golden_prompts(golden))
    prompt = golden[f"prompt_{j}"].tolist()
    token_logprobs = []
    for chunk in client.completions.create(model="grok-test", prompt=prompt, max_tokens=2, temperature=0,
                                           echo=True, logprobs=0, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                token_logprobs += choice.logprobs.token_logprobs
    assert token_logprobs[0] is None and len(token_logprobs) == len(prompt) + 2
    np.testing.assert_allclose(token_logprobs[1:len(prompt)], expected_logprobs(golden, j), atol=1e-3)


def test_vllm_prompt_logprobs_field_on_completions_and_chat(client, golden):
    j = max(golden_prompts(golden))
    prompt = golden[f"prompt_{j}"].tolist()
    out = client.completions.create(model="grok-test", prompt=prompt, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    got = out.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(prompt)
    want = expected_logprobs(golden, j)
    for i, entry in enumerate(got[1:]):
        token = str(prompt[i + 1])
        assert abs(entry[token]["logprob"] - want[i]) <= 1e-3 and entry[token]["rank"] >= 1
        assert len(entry) in (2, 3)  # the prompt token plus the top 2, which may include it
    chat = client.chat.completions.create(model="grok-test", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=1, extra_body={"prompt_logprobs": 0})
    entries = chat.model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == chat.usage.prompt_tokens
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in entries[1:])


def test_bad_prompt_logprobs_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="grok-test", prompt="hi", max_tokens=1,
                                  extra_body={"prompt_logprobs": -1})
    assert info.value.body["param"] == "prompt_logprobs"
