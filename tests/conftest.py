from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = (REPO / ".." / "shared" / "grok1-reference").resolve()
TINY = REFERENCE / "tiny"


def reference_or_skip() -> Path:
    if not (TINY / "ckpt-0").is_dir():
        pytest.skip(f"Grok-1 reference data not found at {REFERENCE} (it lives beside the repository in "
                    f"../shared/grok1-reference); golden tests skipped")
    return TINY


@pytest.fixture(scope="session")
def tiny_reference() -> Path:
    return reference_or_skip()


@pytest.fixture(scope="session")
def golden_f32(tiny_reference) -> dict[str, np.ndarray]:
    return dict(np.load(tiny_reference / "golden_float32.npz"))


@pytest.fixture(scope="session")
def golden_bf16(tiny_reference) -> dict[str, np.ndarray]:
    return dict(np.load(tiny_reference / "golden_bfloat16.npz"))


def golden_prompts(golden: dict[str, np.ndarray]) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in golden if k.startswith("prompt_"))


@pytest.fixture(scope="session")
def tiny_model_f32(tiny_reference):
    from services.model import load_model
    return load_model(tiny_reference, "float32")
