"""The Serve configs in deploy/ and the Dockerfile.

The GPU configs cannot run here, so what is checked is everything that does not need a GPU: they load
through the same paths as `grok-serve up --config FILE` and `serve run services.serve_app:build_app
config=FILE`, their parallel layout is consistent, and the memory they ask for fits the GPUs they are
written for. The image cannot be built here (no container engine), so the Dockerfile is checked for
what can be: the files it copies exist and reach the build context, the package is installed with
`pip install .` after the CUDA build of torch, and its commands are real `grok-serve` commands.
"""
from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import yaml

from services.gateway.config import config_to_dict, load_config
from services.model.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
GPU_CONFIGS = {"h100x8.yaml": 80e9, "h200x8.yaml": 141e9}  # HBM per GPU
GB = 1e9


def cli_parser() -> argparse.ArgumentParser:
    """The `grok-serve` console script's parser."""
    from services.cli import build_parser

    return build_parser()


# --- deploy/*.yaml ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_config_loads_like_grok_serve_up_and_serve_run(name):
    from ray.serve.deployment import Application

    from services.cli import config_from_args
    from services.serve_app import build_app

    path = DEPLOY / name
    direct = load_config(path)
    args = cli_parser().parse_args(["up", "--config", str(path)])
    assert config_from_args(args) == direct
    # `serve run services.serve_app:build_app config=FILE` hands build_app {"config": "FILE"}.
    assert isinstance(build_app({"config": str(path)}), Application)


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_config_layout(name):
    config = load_config(DEPLOY / name)
    e, d = config.engine, config.engine_deployment
    assert e.device == "cuda" and e.dtype == "bfloat16"
    # One model instance over the node's 8 GPUs, one GPU per rank, placed together.
    assert e.parallel_size == 8 and d.parallel_size is None  # stated once, in the engine section
    assert d.num_gpus == 1
    grok = PRESETS["grok-1"]
    assert grok.num_kv_heads % e.parallel_size == 0 and grok.num_experts % e.parallel_size == 0
    assert e.max_model_len is not None and e.max_model_len <= grok.max_seq_len
    assert e.max_num_batched_tokens >= e.max_model_len, "a full-context prompt prefills in one step"
    assert config.host == "0.0.0.0" and config.auth.enabled, "a network-facing server requires API keys"
    assert config.grpc_port is not None


def _weight_bytes_per_gpu(parallel_size: int, expert_bytes: int) -> float:
    """Grok-1's weights on one rank: 1/N of the experts (expert parallel), of attention (tensor parallel)
    and of the vocabulary (vocab parallel); attention and embeddings in bf16."""
    c = PRESETS["grok-1"]
    experts = c.num_layers * c.num_experts * 3 * c.emb_size * c.ffn_size
    attention = c.num_layers * c.emb_size * (2 * c.q_size + 2 * c.kv_size)
    embedding = c.vocab_size * c.emb_size
    return (experts * expert_bytes + (attention + embedding) * 2) / parallel_size


def _kv_bytes_per_token_per_gpu(parallel_size: int) -> int:
    c = PRESETS["grok-1"]
    return c.num_layers * 2 * (c.num_kv_heads // parallel_size) * c.key_size * 2


@pytest.mark.parametrize("name,hbm", sorted(GPU_CONFIGS.items()))
def test_gpu_config_fits_the_gpu(name, hbm):
    config = load_config(DEPLOY / name)
    e = config.engine
    int8 = _weight_bytes_per_gpu(e.parallel_size, 1)
    assert 39 * GB < int8 < 42 * GB, "the design's figure: 38.6 GB of int8 experts + 1.4 GB attention"
    # Activations, NCCL buffers, CUDA graphs and the allocator's slack need room beyond weights + KV.
    headroom = 8 * GB
    assert int8 + e.kv_cache_memory_bytes + headroom <= hbm
    if hbm > 100 * GB:
        # The H200 budget also holds bf16 experts, so serving them unquantized needs no new KV size.
        assert _weight_bytes_per_gpu(e.parallel_size, 2) + e.kv_cache_memory_bytes + headroom <= hbm
    # Room for dozens of full-context sequences at once, or the batch never fills.
    tokens = e.kv_cache_memory_bytes // _kv_bytes_per_token_per_gpu(e.parallel_size)
    assert tokens >= 32 * e.max_model_len


def test_gpu_configs_differ_only_in_capacity():
    h100, h200 = (config_to_dict(load_config(DEPLOY / n)) for n in ("h100x8.yaml", "h200x8.yaml"))
    # The expert storage is part of the memory plan: int8 on 80 GB, bf16 where 141 GB holds it.
    capacity = {"kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens", "max_ongoing_requests",
                "max_queued_requests", "expert_dtype"}

    def strip(d):
        return {s: {k: v for k, v in d[s].items() if k not in capacity} if isinstance(d[s], dict) else d[s]
                for s in d}

    assert strip(h100) == strip(h200)
    assert h200["engine"]["kv_cache_memory_bytes"] > h100["engine"]["kv_cache_memory_bytes"]
    assert (h100["engine"]["expert_dtype"], h200["engine"]["expert_dtype"]) == ("int8", "bfloat16")


# --- Dockerfile ------------------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in _instructions() if op == "ARG" and "=" in rest)


def _exec_form(rest: str) -> list[str]:
    return yaml.safe_load(rest)  # a JSON array


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:  # later patterns win, `!` re-includes
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_base_is_cuda_runtime_and_runs_as_non_root():
    instructions = _instructions()
    args = _args()
    (base,) = [rest for op, rest in instructions if op == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-(cudnn-)?runtime-ubuntu[0-9.]+", base), base
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0] == "1000", "the chart's podSecurityContext runs as uid 1000"
    exposed = {p for op, rest in instructions if op == "EXPOSE" for p in rest.split()}
    assert {"8000", "9000"} <= exposed


def test_dockerfile_installs_cuda_torch_then_the_package():
    runs = [rest for op, rest in _instructions() if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \"?torch==", r))
    assert "--index-url" in runs[torch_step] and "download.pytorch.org/whl/cu" in _args()["TORCH_INDEX_URL"]
    package_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_step < package_step
    # The torch pin is the one the README gives for GPU hosts.
    readme_pins = set(re.findall(r"torch==([0-9.]+)", (REPO / "README.md").read_text()))
    assert _args()["TORCH_VERSION"] in readme_pins
    # Ray in the image is the Ray the chart tells KubeRay about.
    chart_values = yaml.safe_load((REPO / "helm" / "grok-serve" / "values.yaml").read_text())
    assert _args()["RAY_VERSION"] == chart_values["rayVersion"]


def test_dockerfile_copies_what_exists_and_is_in_the_build_context():
    patterns = _dockerignore()
    copied = []
    for op, rest in _instructions():
        if op == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            copied += parts[:-1]
    assert {"pyproject.toml", "services", "kernels"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    # pyproject's readme must be in the image, or `pip install .` fails to build the metadata.
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert readme is None or readme.group(1) in copied
    for heavy in (".venv", ".git", "tests", "helm"):
        assert _ignored(heavy, patterns), f"{heavy} should stay out of the build context"


def test_dockerfile_commands_are_real_cli_commands():
    instructions = _instructions()
    (cmd,) = [_exec_form(rest) for op, rest in instructions if op == "CMD"]
    assert cmd[0] == "grok-serve"
    args = cli_parser().parse_args(cmd[1:])
    if getattr(args, "config", None):
        from services.cli import config_from_args

        assert (REPO / args.config).is_file() and args.config.startswith("deploy/")
        config = config_from_args(args)
        assert config.host == "0.0.0.0", "reachable from outside the container"
        assert config.port == 8000
    (health,) = [rest for op, rest in instructions if op == "HEALTHCHECK"]
    probe = _exec_form(health[health.index("CMD") + 3:].strip())
    assert probe[:2] == ["python", "-c"] and "/health" in probe[2]
    compile(probe[2], "HEALTHCHECK", "exec")
    start_period = re.search(r"--start-period=(\d+)s", health)
    assert start_period and int(start_period.group(1)) >= 600, "model loading takes minutes"
    # `grok-serve ...` inside RUN steps parse as well.
    for op, rest in instructions:
        if op == "RUN":
            for call in re.findall(r"grok-serve ([^&|;>]*)", rest):
                argv = shlex.split(call)
                if argv == ["--help"]:
                    continue
                cli_parser().parse_args(argv)
