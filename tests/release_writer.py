"""Writes small checkpoints in the release format (random configs) for loader tests."""
from __future__ import annotations

import json
from pathlib import Path

from services.model import release_format
from services.model.checkpoint import dummy_weights
from services.model.config import Grok1Config


def write_release(root: Path, config: Grok1Config, seed: int = 0, with_config: bool = True) -> Path:
    (root / "ckpt-0").mkdir(parents=True, exist_ok=True)
    for index, (_, value, _, _) in enumerate(dummy_weights(config, seed)):
        release_format.write_tensor(release_format.tensor_path(root, index), value)
    if with_config:
        (root / "config.json").write_text(json.dumps(config.to_reference_dict()))
    return root
