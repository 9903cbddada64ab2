"""Grok-1 through vLLM's LLM API with the plugin (services/vllm_plugin), against the golden outputs of
the JAX reference. vLLM runs in its own virtualenv (tests/vllm_env.py), in a child process."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import golden_prompts
from tests.vllm_env import ROOT, vllm_python

TOL = 1e-3  # ../shared/grok1-reference/README.md


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()


@pytest.fixture(scope="module")
def vllm_run(tiny_reference, tmp_path_factory) -> dict:
    python = vllm_python()
    out = tmp_path_factory.mktemp("vllm") / "run.json"
    result = subprocess.run(
        [str(python), str(ROOT / "tests" / "vllm_plugin_run.py"), str(tiny_reference),
         str(tiny_reference / "golden_float32.npz"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, f"vLLM run failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return json.loads(Path(out).read_text())


@pytest.mark.slow
def test_greedy_tokens_match_reference(vllm_run, golden_f32):
    results = {r["prompt"]: r for r in vllm_run["results"]}
    assert sorted(results) == golden_prompts(golden_f32)
    for j, result in results.items():
        assert result["tokens"] == golden_f32[f"greedy_{j}"].tolist(), f"prompt {j}"


@pytest.mark.slow
def test_prompt_logprobs_match_reference_logits(vllm_run, golden_f32):
    # vLLM's log p(prompt[i] | prompt[:i]) against the same from the reference's logits at i - 1.
    for result in vllm_run["results"]:
        j = result["prompt"]
        prompt, expected = golden_f32[f"prompt_{j}"], log_softmax(golden_f32[f"logits_{j}"])
        assert result["prompt_logprobs"][0] is None
        for i in range(1, len(prompt)):
            err = abs(result["prompt_logprobs"][i] - expected[i - 1, prompt[i]])
            assert err <= TOL, f"prompt {j}, position {i}: |logprob - golden| = {err}"


@pytest.mark.slow
def test_generated_logprobs_match_reference(vllm_run, golden_f32, tiny_model_f32):
    # The first generated token's logprob comes straight from the reference's last prompt logits. The
    # later ones are checked against the native model scoring prompt + greedy tokens in one prefill:
    # that model reproduces every reference logit within 4e-5 (tests/test_golden.py).
    for result in vllm_run["results"]:
        j = result["prompt"]
        prompt, tokens = golden_f32[f"prompt_{j}"], result["tokens"]
        first = log_softmax(golden_f32[f"logits_{j}"][-1])[tokens[0]]
        assert abs(result["logprobs"][0] - first) <= TOL, f"prompt {j}, first token"
        native = log_softmax(tiny_model_f32.score(np.concatenate([prompt, tokens[:-1]])))[len(prompt) - 1:]
        expected = native[np.arange(len(tokens)), tokens]
        err = np.abs(np.array(result["logprobs"]) - expected).max()
        assert err <= TOL, f"prompt {j}: max |logprob - native| = {err}"


def test_missing_softcap_would_be_detected(tiny_reference, golden_f32):
    # vLLM's CPU attention applies the soft-cap (30 tanh(s / 30)); this proves the tolerance above
    # would catch a backend that skipped it: the same model without the cap misses the golden logits.
    from services.model import load_model
    from services.model.checkpoint import load_weights, resolve_source
    from services.model.grok1 import Grok1

    config, path, load_format = resolve_source(tiny_reference)
    uncapped = Grok1(config.replace(attn_logit_softcap=1e30))
    load_weights(uncapped, path, load_format)
    capped = load_model(tiny_reference)
    worst = max(np.abs(uncapped.score(golden_f32[f"prompt_{j}"]) - golden_f32[f"logits_{j}"]).max()
                for j in golden_prompts(golden_f32))
    best = max(np.abs(capped.score(golden_f32[f"prompt_{j}"]) - golden_f32[f"logits_{j}"]).max()
               for j in golden_prompts(golden_f32))
    assert best <= TOL < worst, (best, worst)


@pytest.mark.parametrize("key_size,supported,expected", [
    (8, [32, 64, 80], 32), (64, [32, 64, 80], 64), (72, [32, 64, 80], 80), (128, None, 128), (8, [], 8),
])
def test_padded_head_size(key_size, supported, expected):
    from services.vllm_plugin.attention import padded_head_size

    assert padded_head_size(key_size, supported) == expected


def test_head_size_beyond_the_backend_is_refused():
    from services.vllm_plugin.attention import padded_head_size

    with pytest.raises(ValueError, match="exceeds every head size"):
        padded_head_size(600, [32, 512])


def test_vllm_config_carries_the_whole_grok1_config():
    from types import SimpleNamespace

    from services.model.config import PRESETS
    from services.vllm_plugin.config_parser import grok1_config, hf_config_dict

    config = PRESETS["grok-1"]
    data = hf_config_dict(config)
    assert data["architectures"] == ["Grok1ForCausalLM"]
    assert (data["num_attention_heads"], data["num_key_value_heads"], data["head_dim"]) == (48, 8, 128)
    assert data["max_position_embeddings"] == 8192 and data["vocab_size"] == 131072
    assert grok1_config(SimpleNamespace(**data)) == config


def gateway_bodies(golden: dict[str, np.ndarray]) -> list[dict]:
    from services.model.tokenizer import load_tokenizer

    greedy = {"max_tokens": 24, "temperature": 0, "return_token_ids": True}
    bodies = [{**greedy, "prompt": golden[f"prompt_{j}"].tolist(), "ignore_eos": True} for j in golden_prompts(golden)]
    # Prompt 2's greedy continuation holds EOS (id 2) at position 10: without ignore_eos both stop there.
    bodies.append({**greedy, "prompt": golden["prompt_2"].tolist()})
    # Prompt 1's continuation decodes to text (byte tokens): a stop string inside it, and streaming.
    text = load_tokenizer(None, 1024).decode(golden["greedy_1"].tolist())
    bodies.append({**greedy, "prompt": golden["prompt_1"].tolist(), "ignore_eos": True, "stop": [text[4:6]]})
    bodies.append({**greedy, "prompt": golden["prompt_1"].tolist(), "ignore_eos": True, "stream": True})
    bodies.append({**greedy, "prompt": golden["prompt_0"].tolist(), "max_tokens": 4, "logprobs": 3})
    bodies.append({**greedy, "prompt": [5, 100000]})
    # logit_bias: a forced token and a banned one, the same on both backends.
    bodies.append({**greedy, "prompt": golden["prompt_0"].tolist(), "max_tokens": 4, "ignore_eos": True,
                   "logit_bias": {"7": 100, str(int(golden["greedy_0"][0])): -100}})
    return bodies


@pytest.fixture(scope="module")
def gateway_answers(tiny_reference, golden_f32, tmp_path_factory) -> tuple[list[dict], dict, dict]:
    """(bodies, native answers, vLLM answers) for the same requests through the same gateway, both
    engines loading the reference checkpoint converted to safetensors (the LLM API run above reads
    the release pickles)."""
    import asyncio

    from services.engine.async_engine import AsyncEngine, LocalEngineClient
    from services.engine.engine import LLMEngine
    from services.model.convert import convert_release
    from tests.vllm_gateway_run import answer, gateway_config

    python = vllm_python()
    bodies = gateway_bodies(golden_f32)
    work = tmp_path_factory.mktemp("vllm-gateway")
    checkpoint = work / "tiny-safetensors"
    convert_release(tiny_reference, checkpoint)
    (work / "bodies.json").write_text(json.dumps(bodies))
    result = subprocess.run(
        [str(python), str(ROOT / "tests" / "vllm_gateway_run.py"), str(checkpoint), str(work / "bodies.json"),
         str(work / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, f"gateway run failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    config = gateway_config(str(checkpoint), "native")

    async def native() -> dict:
        client = LocalEngineClient(AsyncEngine(LLMEngine(config.engine)))
        try:
            return await answer(client, config, bodies)
        finally:
            await client.shutdown()

    return bodies, asyncio.run(native()), json.loads((work / "out.json").read_text())


@pytest.mark.slow
def test_gateway_on_the_vllm_backend_serves_golden_tokens(gateway_answers, golden_f32):
    _, _, ours = gateway_answers
    for j in golden_prompts(golden_f32):
        answer = ours["answers"][j]
        assert answer["status"] == 200, answer
        assert answer["body"]["choices"][0]["token_ids"] == golden_f32[f"greedy_{j}"].tolist(), f"prompt {j}"


@pytest.mark.slow
def test_gateway_answers_alike_on_both_backends(gateway_answers):
    # Text, token ids, EOS, stop strings, streaming, logprobs, usage and errors, request by request.
    bodies, native, vllm = gateway_answers
    assert any(a["status"] == 200 and a["body"]["choices"][0]["finish_reason"] == "stop"
               for a in native["answers"]), "no request ended on EOS or a stop string: the check is weak"
    for body, a, b in zip(bodies, native["answers"], vllm["answers"], strict=True):
        assert a["status"] == b["status"], (body, a, b)
        if body.get("stream"):
            assert (a["text"], a["finish_reason"]) == (b["text"], b["finish_reason"]), body
            continue
        if a["status"] != 200:
            assert a["body"]["error"]["message"] == b["body"]["error"]["message"]
            continue
        (ca,), (cb,) = a["body"]["choices"], b["body"]["choices"]
        for key in ("text", "token_ids", "finish_reason"):
            assert ca[key] == cb[key], (key, body, ca, cb)
        # Cached prompt tokens are left out: each engine caches at its own block size (16 here, 128 in
        # vLLM's CPU backend), so the same repeated prompt hits in one and not in the other.
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert a["body"]["usage"][key] == b["body"]["usage"][key], (key, body)
        if body.get("logprobs"):
            la, lb = ca["logprobs"], cb["logprobs"]
            assert la["tokens"] == lb["tokens"]
            assert np.allclose(la["token_logprobs"], lb["token_logprobs"], atol=TOL)
            for ta, tb in zip(la["top_logprobs"], lb["top_logprobs"], strict=True):
                assert ta.keys() == tb.keys()
                assert np.allclose([ta[k] for k in ta], [tb[k] for k in ta], atol=TOL)


@pytest.mark.slow
def test_vllm_backend_metrics_reach_prometheus(gateway_answers):
    _, _, vllm = gateway_answers
    generated = [float(line.split()[-1]) for line in vllm["metrics"].splitlines()
                 if line.startswith("grok_serve:generation_tokens_total{")]
    assert generated and generated[0] >= 4 * 24
