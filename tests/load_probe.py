"""How much memory loading one rank's shard takes, measured in a fresh process (a test helper: the
engine measures its own ranks while loading, services/engine/rank.py)."""
from __future__ import annotations

import concurrent.futures
import multiprocessing

import torch

from services.engine.parallel import Rendezvous
from services.engine.rank import LoadReport, RankSpec, load_shard


def _measure_in_this_process(spec: RankSpec, rank: int) -> LoadReport:
    import services.model.checkpoint  # noqa: F401 - imports are not part of what loading costs

    return load_shard(spec, rank, None, torch.device(spec.device))[1]


def measure_load(model: str, size: int, rank: int, dtype: str = "float32", load_format: str = "auto",
                 seed: int = 0) -> LoadReport:
    """Load one rank's shard in a fresh process (no group needed: loading never communicates), so
    that memory an earlier load freed but still holds does not hide this one's growth."""
    rdv = Rendezvous("127.0.0.1", 0, size, False, 1.0)
    spec = RankSpec(rdv, str(model), dtype, load_format, seed, "cpu")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measure_in_this_process, spec, rank).result()
