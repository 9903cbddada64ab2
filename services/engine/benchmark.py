"""Offline throughput benchmark: a fixed batch workload through `LLM.generate`, optionally beside vLLM.

The workload (random prompt ids from a seed, every request generating exactly output_len tokens) is
the one the vLLM peer script (loadtests/peers/vllm/offline_bench.py) runs, so the two rows compare.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
PEER_DIR = REPO / "loadtests" / "peers" / "vllm"


@dataclass(frozen=True)
class Workload:
    num_requests: int = 64
    prompt_len: int = 128
    output_len: int = 128
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed)
        # Ids from 4 up: no control tokens in the prompts.
        return rng.integers(4, vocab_size, size=(self.num_requests, self.prompt_len)).tolist()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_ours(model: str, dtype: str, workload: Workload, **engine_options) -> dict:
    llm = LLM(model, dtype=dtype, **engine_options)
    prompts = workload.prompts(llm.engine.model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    stats = llm.engine.stats
    steps0, fwd0, step0 = stats.steps, stats.forward_s_total, stats.step_s_total
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = stats.steps - steps0
    overhead = (stats.step_s_total - step0) - (stats.forward_s_total - fwd0)
    return {
        "engine": "grok-serve", "model": model, "dtype": dtype, **asdict(workload),
        "generated_tokens": generated, "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(generated / elapsed, 2), "steps": steps,
        "overhead_ms_per_step": round(1000 * overhead / max(steps, 1), 3),
        "overhead_fraction": round(overhead / elapsed, 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
    }


def run_vllm(python: Path, workload: Workload, dims: dict, dtype: str, timeout_s: int = 3600) -> dict:
    """The peer in its own virtualenv (loadtests/peers/vllm/setup.sh makes it)."""
    if not python.exists():
        raise FileNotFoundError(f"{python} not found: create the vLLM virtualenv with "
                                f"loadtests/peers/vllm/setup.sh")
    model_dir = REPO / ".cache" / "vllm-mixtral-cpu-bench"
    subprocess.run([str(python), str(PEER_DIR / "mixtral_config.py"), str(model_dir),
                    "--dims-json", json.dumps(dims)], check=True, capture_output=True, text=True)
    cmd = [str(python), str(PEER_DIR / "offline_bench.py"), "--model", str(model_dir),
           "--num-requests", str(workload.num_requests), "--prompt-len", str(workload.prompt_len),
           "--output-len", str(workload.output_len), "--seed", str(workload.seed), "--dtype", dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode:
        raise RuntimeError(f"vLLM peer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {"engine": "vllm", **json.loads(line)}


def mixtral_dims(model: str) -> dict:
    from services.model.config import get_preset

    c = get_preset(model)
    return {"hidden_size": c.emb_size, "intermediate_size": c.ffn_size, "num_attention_heads": c.num_q_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.key_size, "num_hidden_layers": c.num_layers,
            "num_local_experts": c.num_experts, "num_experts_per_tok": c.num_selected_experts,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len,
            "rope_theta": c.rope_base, "rms_norm_eps": c.rms_norm_eps}
