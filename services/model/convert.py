"""Release pickles -> safetensors shards (release names, int8 kept int8), so restarts mmap, never unpickle.
A preset name instead of a directory writes its random (dummy) weights: a checkpoint other engines
(the vLLM plugin) can load to compare on the same weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from services.model.checkpoint import (
    SAFETENSORS_INDEX,
    SCALES_SUFFIX,
    Progress,
    checkpoint_bytes,
    dummy_weights,
    iter_release,
    to_torch,
)
from services.model.config import PRESETS, Grok1Config
from services.model.release_format import CheckpointError, QuantizedWeight8bit


def convert_release(source: Path | str, dest: Path, shard_bytes: int = 4 << 30, seed: int = 0) -> dict:
    """Streams file by file: at most one output shard (plus one tensor) is held in memory."""
    from safetensors.torch import save_file

    if str(source) in PRESETS:
        config = PRESETS[str(source)]
        tensors, tokenizer = dummy_weights(config, seed), None
        progress = Progress(f"converting {source}", 0)
    else:
        config = Grok1Config.from_dir(source)
        tensors, tokenizer = iter_release(Path(source), config), Path(source) / "tokenizer.model"
        progress = Progress(f"converting {source}", checkpoint_bytes(Path(source)))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.glob("*.safetensors")):
        raise CheckpointError(f"{dest}: already holds safetensors files; choose an empty directory")
    weight_map: dict[str, str] = {}
    pending: dict = {}
    pending_bytes, shard_files, total = 0, [], 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(pending, str(dest / name), metadata={"format": "grok1-release"})
            weight_map.update({k: name for k in pending})
            shard_files.append(name)
        pending, pending_bytes = {}, 0

    for name, value, _, _ in tensors:
        arrays = {name: value.weight, name + SCALES_SUFFIX: value.scales} \
            if isinstance(value, QuantizedWeight8bit) else {name: value}
        size = sum(a.nbytes for a in arrays.values())
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending.update({k: to_torch(np.ascontiguousarray(a)) for k, a in arrays.items()})
        pending_bytes += size
        total += size
        progress.advance(size)
    flush()
    progress.report(final=True)
    # Shards are renamed to the usual "-of-N" form once N is known.
    final = {}
    for i, name in enumerate(shard_files):
        new = f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
        (dest / name).rename(dest / new)
        final[name] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (dest / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    (dest / "config.json").write_text(json.dumps(config.to_reference_dict(), indent=1))
    if tokenizer is not None and tokenizer.exists():
        shutil.copyfile(tokenizer, dest / "tokenizer.model")
    return {"shards": len(shard_files), "bytes": total, "tensors": len(weight_map)}
