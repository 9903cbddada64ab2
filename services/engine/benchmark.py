"""Offline throughput benchmark: a fixed batch workload through `LLM.generate`, optionally beside vLLM.

The workload (random prompt ids from a seed, every request generating exactly output_len tokens) is
the one the vLLM peer script (loadtests/peers/vllm/offline_bench.py) runs, so the two rows compare.
"""
from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
        # The peer script's generator, so both engines see the same token ids; ids from 3 up skip the
        # pad/bos/eos control tokens.
        rng = random.Random(self.seed)
        return [[rng.randrange(3, vocab_size) for _ in range(self.prompt_len)]
                for _ in range(self.num_requests)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class TimedRun:
    outputs: list
    elapsed_s: float
    steps: int
    overhead_s: float  # step time outside the model's forward passes (scheduling, sampling, text)


def timed_generate(llm: LLM, prompts, params) -> TimedRun:
    stats = llm.engine.stats
    steps0, fwd0, step0 = stats.steps, stats.forward_s_total, stats.step_s_total
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    overhead = (stats.step_s_total - step0) - (stats.forward_s_total - fwd0)
    return TimedRun(outs, elapsed, stats.steps - steps0, overhead)


def run_ours(model: str, dtype: str, workload: Workload, **engine_options) -> dict:
    llm = LLM(model, dtype=dtype, **engine_options)
    prompts = workload.prompts(llm.engine.model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    run = timed_generate(llm, prompts, params)
    outs, elapsed, steps, overhead = run.outputs, run.elapsed_s, run.steps, run.overhead_s
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "engine": "grok-serve", "model": model, "dtype": dtype, **asdict(workload),
        "generated_tokens": generated, "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(generated / elapsed, 2), "steps": steps,
        "overhead_ms_per_step": round(1000 * overhead / max(steps, 1), 3),
        "overhead_fraction": round(overhead / elapsed, 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
    }


def run_vllm(python: Path, workload: Workload, model: str, dtype: str, timeout_s: int = 3600,
             plugin: bool = False) -> dict:
    """The peer in its own virtualenv (loadtests/peers/vllm/setup.sh makes it). plugin=False: vLLM's
    Mixtral on a config with the preset's dimensions (loadtests/peers/vllm/mixtral_config.py reads our
    reference names), dummy weights. plugin=True: Grok-1 through services/vllm_plugin, loading the
    checkpoint directory `model` (benchmark_checkpoint makes one from a preset)."""
    from services.model.config import get_preset

    if not python.exists():
        raise FileNotFoundError(f"{python} not found: create the vLLM virtualenv with "
                                f"loadtests/peers/vllm/setup.sh")
    if plugin:
        source = ["--model-dir", str(model), "--grok1-plugin"]
    else:
        dims = REPO / ".cache" / f"{model}-dims.json"
        dims.parent.mkdir(exist_ok=True)
        dims.write_text(json.dumps(get_preset(model).to_reference_dict()))
        source = ["--model-json", str(dims)]
    cmd = [str(python), str(PEER_DIR / "offline_bench.py"), *source,
           "--num-requests", str(workload.num_requests), "--prompt-len", str(workload.prompt_len),
           "--output-len", str(workload.output_len), "--seed", str(workload.seed), "--dtype", dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"vLLM peer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {"engine": "vllm-grok1-plugin" if plugin else "vllm", **json.loads(line)}


def benchmark_checkpoint(model: str) -> Path:
    """A checkpoint directory for `model`: itself, or for a preset its random weights written once as
    safetensors under .cache/, so that two engines load the very same weights."""
    from services.model.config import PRESETS
    from services.model.convert import convert_release

    if model not in PRESETS:
        return Path(model)
    path = REPO / ".cache" / f"{model}-checkpoint"
    if not (path / "config.json").exists():
        convert_release(model, path)
    return path
