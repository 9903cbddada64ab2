"""lm-evaluation-harness (`lm_eval` from PyPI) against a running server with its `local-completions`
model: a loglikelihood (multiple-choice) task and a generate-until task, both defined in local files
(no dataset download). The harness tokenizes through the server (/tokenizer_info, /tokenize,
/detokenize) and scores with completions `echo` + `logprobs`; every number it reports is checked
against the same weights run in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.engine.config import EngineConfig
from services.gateway.config import AppConfig
from tests.test_gateway_support import LocalServer

pytest.importorskip("lm_eval")

MODEL = "tiny"
QUESTIONS = [  # (context, choices, index of the right answer)
    ("The sky is", [" blue", " green", " made of cheese"], 0),
    ("2 + 2 =", [" 4", " 5"], 0),
    ("Paris is in", [" France", " Spain", " Peru", " Mars"], 2),
    ("Hello", [" world", "!"], 1),
]
PROMPTS = ["Once upon a time", "Q: What is Grok?\nA:", "abc"]
MAX_GEN = 12

TASK_HEAD = """\
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
target_delimiter: ""
"""
LL_TASK = TASK_HEAD + """\
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
"""
GEN_TASK = TASK_HEAD + """\
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: {max_gen}}}
metric_list: [{{metric: exact_match}}]
"""


@pytest.fixture(scope="module")
def server():
    config = AppConfig(engine=EngineConfig(model=MODEL, dtype="float32", max_model_len=128,
                                           kv_cache_memory_bytes=8 << 20), served_model_name="grok-eval")
    with LocalServer(config) as s:
        yield s


@pytest.fixture(scope="module")
def model():
    from services.model import load_model

    return load_model(MODEL, "float32")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """As the harness splits a pair: the whole text's tokens after the context's own."""
    whole = tokenizer.encode(context + continuation)
    n = len(tokenizer.encode(context))
    logits = model.score(whole).astype(np.float64)  # [len, V]
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    rows = np.arange(n - 1, len(whole) - 1)
    targets = np.asarray(whole[n:])
    return float(lp[rows, targets].sum()), bool((lp[rows].argmax(-1) == targets).all())


def greedy_text(model, tokenizer, prompt: str) -> str:
    ids = model.generate(tokenizer.encode(prompt), MAX_GEN, stop_token_ids=(tokenizer.eos_id,))
    return tokenizer.decode(ids).split("\n")[0]


def test_loglikelihood_and_generate_until_tasks(server, model, tmp_path: Path):
    tokenizer = server.context.tokenizer
    expected_ll = [[loglikelihood(model, tokenizer, c, ch) for ch in choices] for c, choices, _ in QUESTIONS]
    expected_gen = [greedy_text(model, tokenizer, p) for p in PROMPTS]
    # Half the targets are the model's own greedy text: exact_match must then be exactly that half.
    targets = [text if i % 2 == 0 else text + "#" for i, text in enumerate(expected_gen)]

    ll_data, gen_data = tmp_path / "ll.jsonl", tmp_path / "gen.jsonl"
    ll_data.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n"
                               for c, ch, a in QUESTIONS))
    gen_data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in zip(PROMPTS, targets)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "grok_local_ll.yaml").write_text(LL_TASK.format(name="grok_local_ll", data=ll_data))
    (tasks / "grok_local_gen.yaml").write_text(GEN_TASK.format(name="grok_local_gen", data=gen_data, max_gen=MAX_GEN))

    out = tmp_path / "out"
    model_args = (f"base_url={server.url}/v1/completions,model=grok-eval,tokenizer_backend=remote,"
                  "tokenized_requests=True,num_concurrent=2,max_retries=1,timeout=600")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "OPENAI_API_KEY": "unused"}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "grok_local_ll,grok_local_gen", "--include_path", str(tasks), "--output_path", str(out),
         "--log_samples", "--seed", "0"],
        check=False, capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]

    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    expected_acc = np.mean([int(np.argmax([ll for ll, _ in lls]) == a) for lls, (_, _, a) in zip(expected_ll, QUESTIONS)])
    assert results["grok_local_ll"]["acc,none"] == pytest.approx(expected_acc)
    assert results["grok_local_gen"]["exact_match,none"] == pytest.approx(np.mean([i % 2 == 0 for i in range(len(PROMPTS))]))

    [ll_samples] = out.rglob("samples_grok_local_ll_*.jsonl")
    for line in ll_samples.read_text().splitlines():
        sample = json.loads(line)
        doc = sample["doc_id"]
        got = [(float(ll), is_greedy == "True") for [[ll, is_greedy]] in sample["resps"]]
        np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in expected_ll[doc]], atol=1e-3)
        assert [g for _, g in got] == [g for _, g in expected_ll[doc]]
    [gen_samples] = out.rglob("samples_grok_local_gen_*.jsonl")
    for line in gen_samples.read_text().splitlines():
        sample = json.loads(line)
        assert sample["filtered_resps"] == [expected_gen[sample["doc_id"]]]


def test_tokenizer_info_is_what_the_harness_reads(server):
    import httpx

    info = httpx.get(server.url + "/tokenizer_info").json()
    tok = server.context.tokenizer
    assert info["eos_token_id"] == tok.eos_id and info["bos_token_id"] == tok.bos_id
    assert info["model_max_length"] == 128 and info["vocab_size"] == tok.vocab_size
    assert "messages" in info["chat_template"]
    with_bos = httpx.post(server.url + "/tokenize", json={"prompt": "hi", "add_special_tokens": True}).json()
    plain = httpx.post(server.url + "/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
    assert with_bos["tokens"] == [tok.bos_id, *plain["tokens"]] == [tok.bos_id, *tok.encode("hi")]
