"""Runs in the vLLM virtualenv (tests/vllm_env.py): greedy generation through vLLM's LLM API with the
Grok-1 plugin, written as JSON for tests/test_vllm_plugin.py to check against the golden outputs.

    python tests/vllm_plugin_run.py CHECKPOINT_DIR GOLDEN_NPZ OUT_JSON
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(checkpoint: str, golden_file: str, out_file: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    golden = np.load(golden_file)
    keys = sorted((k for k in golden if k.startswith("prompt_")), key=lambda k: int(k.split("_")[1]))
    start = time.perf_counter()
    llm = LLM(model=checkpoint, config_format="grok1", load_format="grok1", skip_tokenizer_init=True,
              dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0)
    startup_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=golden[k].tolist()) for k in keys]
    max_tokens = int(golden[keys[0].replace("prompt", "greedy")].shape[0])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                            prompt_logprobs=0, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.perf_counter() - start
    results = []
    for key, out in zip(keys, outputs, strict=True):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        results.append({
            "prompt": int(key.split("_")[1]),
            "tokens": tokens,
            "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)],
            # Entry i: log p(prompt[i] | prompt[:i]); none for the first token.
            "prompt_logprobs": [None if step is None else step[token].logprob
                                for step, token in zip(out.prompt_logprobs, golden[key].tolist(), strict=True)],
        })
    import vllm

    with open(out_file, "w") as f:
        json.dump({"vllm": vllm.__version__, "startup_s": startup_s, "generate_s": generate_s,
                   "results": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
