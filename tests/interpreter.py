"""Runs a test file's checks in a child pytest with TRITON_INTERPRET=1.

triton reads TRITON_INTERPRET when it is imported, so a file that checks Triton kernels on CPU holds,
in this process, only a test that starts the child on the same file with the variable set; in the
child, only the checks. Other test files never see the variable.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]


def run_file_under_interpreter(path: str | Path, timeout_s: int = 600) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(Path(path).resolve())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    # Exit code 5: the child collected nothing, which would hide every check.
    assert result.returncode == 0, f"interpreter checks failed:\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    if " skipped" in result.stdout and " passed" not in result.stdout:
        reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
        pytest.skip("under the interpreter: " + (reasons[0] if reasons else result.stdout.strip().splitlines()[-1]))
