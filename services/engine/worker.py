"""Ranks 1..N-1 of a parallel group: a Ray actor that joins the group, loads its shard, then runs every
step rank 0 broadcasts until told to stop (services/engine/parallel.py describes the protocol).

Also what every rank shares: loading a shard with its memory measured, and the forward of one step.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass

import torch

from services.engine.parallel import Command, Rendezvous, decode_step, join
from services.engine.runner import StepInputs
from services.model import load_model
from services.model.grok1 import Grok1
from services.model.shard import Comm, Shard


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to join and load; sent once at setup (never per step)."""

    rendezvous: Rendezvous
    model: str
    dtype: str
    load_format: str
    seed: int
    device: str


@dataclass(frozen=True)
class LoadReport:
    rank: int
    size: int
    model_bytes: int  # the rank's model buffers (weights, norms, rotary tables)
    peak_rss_delta_bytes: int  # peak growth of the resident set while loading (PeakRss)
    device_peak_bytes: int  # CUDA: peak allocated while loading; 0 on CPU
    load_s: float


class PeakRss:
    """Growth of the resident set at its peak during a block: Linux's high-water mark is reset first
    (/proc/self/clear_refs), so earlier peaks of the process do not hide this one (elsewhere: the growth
    of getrusage's peak). Memory the process freed but still holds is reused without growing the
    resident set, so figures to compare across layouts come from fresh processes (measure_load)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._proc, self._base = True, _status_kib("VmRSS")
        except OSError:
            self._proc, self._base = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self._proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.bytes = max(0, peak - self._base) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def load_shard(spec: RankSpec, rank: int, comm: Comm | None,
               device: torch.device) -> tuple[Grok1, LoadReport]:
    """This rank's part of the model, and what loading it cost."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with PeakRss() as rss:
        model = load_model(spec.model, spec.dtype, load_format=spec.load_format, seed=spec.seed,
                           shard=Shard(rank, spec.rendezvous.size), comm=comm, device=device)
    model_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    report = LoadReport(rank, spec.rendezvous.size, model_bytes, rss.bytes,
                        torch.cuda.max_memory_allocated(device) if cuda else 0, time.perf_counter() - started)
    return model, report


def _measure_in_this_process(spec: RankSpec, rank: int) -> LoadReport:
    import services.model.checkpoint  # noqa: F401 - imports are not part of what loading costs

    return load_shard(spec, rank, None, torch.device(spec.device))[1]


def measure_load(model: str, size: int, rank: int, dtype: str = "float32", load_format: str = "auto",
                 seed: int = 0) -> LoadReport:
    """Load one rank's shard in a fresh process (no group needed: loading never communicates)."""
    rdv = Rendezvous("127.0.0.1", 0, size, False, 1.0)
    spec = RankSpec(rdv, str(model), dtype, load_format, seed, "cpu")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measure_in_this_process, spec, rank).result()


@torch.inference_mode()
def forward_logits(model: Grok1, kv_cache: tuple[torch.Tensor, torch.Tensor], inputs: StepInputs,
                   count_experts: bool) -> torch.Tensor:
    """One step on this rank's shard -> float32 logits [S, V]. Every rank runs it, collectives included."""
    device = model.in_out_embed.embeddings.device
    hidden = model(inputs.input_ids.to(device), inputs.positions.to(device), kv_cache, inputs.meta,
                   count_experts=count_experts)
    return model.compute_logits(hidden[inputs.sample_indices.to(device)])


class RankWorker:
    """A Ray actor (created by ParallelGroup.start) holding one rank."""

    def __init__(self):
        self.group = None
        self.model: Grok1 | None = None
        self.caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def setup(self, spec: RankSpec, rank: int) -> LoadReport:
        device = torch.device(spec.device)  # on CUDA: the one GPU Ray made visible to this actor
        self.group = join(spec.rendezvous, rank, device)
        self.model, report = load_shard(spec, rank, self.group.comm, device)
        return report

    def serve(self) -> None:
        """Returns on SHUTDOWN; raises (after closing its connections, so rank 0 hears at once) on failure."""
        try:
            while True:
                command, cache, args, payload = self.group.channel.receive()
                if command is Command.SHUTDOWN:
                    return
                if command is Command.ALLOC_KV:
                    self.caches[cache] = self.model.allocate_kv_cache(args[0], args[1])
                elif command is Command.FREE_KV:
                    self.caches.pop(cache, None)
                else:
                    # Rank 0 counts routed tokens for the whole group; the logits are its to sample.
                    inputs = decode_step(args, payload)
                    forward_logits(self.model, self.caches[cache], inputs, count_experts=False)
        except BaseException:
            self.group.close()
            raise


class BundleHolder:
    """Holds rank 0's GPU bundle for an engine process that runs outside the placement group, and
    says which GPU that bundle got."""

    def gpu_id(self) -> int:
        import ray

        return int(ray.get_gpu_ids()[0])
