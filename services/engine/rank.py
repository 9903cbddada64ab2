"""One rank of a parallel group, the same class on every rank (in the spirit of nano-vllm's ModelRunner).

Rank 0, the engine process, calls `Rank.call(command, ...)`: the command is broadcast over the step
channel and then run here. Ranks 1..N-1 are Ray actors of this class whose `loop` receives each
command and runs the same method. services/engine/parallel.py carries the commands;
services/engine/parallel_runner.py starts the group and drives rank 0.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch

from services.engine.parallel import Command, RankGroup, Rendezvous, decode_step, encode_step, join
from services.engine.runner import StepInputs
from services.model.checkpoint import load_model
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
    resident set, so figures to compare across layouts come from fresh processes."""

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


@torch.inference_mode()
def forward_logits(model: Grok1, kv_cache: tuple[torch.Tensor, torch.Tensor], inputs: StepInputs,
                   count_experts: bool) -> torch.Tensor:
    """One step on this rank's shard -> float32 logits [S, V]. Every rank runs it, collectives included."""
    device = model.in_out_embed.embeddings.device
    hidden = model(inputs.input_ids.to(device), inputs.positions.to(device), kv_cache, inputs.meta,
                   count_experts=count_experts)
    return model.compute_logits(hidden[inputs.sample_indices.to(device)])


class Rank:
    """One rank's model shard and KV caches (by cache id), and the commands every rank runs alike."""

    def __init__(self):
        self.group: RankGroup | None = None
        self.model: Grok1 | None = None
        self.caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, spec: RankSpec, rank: int, store=None, device: torch.device | None = None) -> LoadReport:
        """Join the group (rank 0 passes the master store and its device) and load this rank's shard."""
        if device is None:
            device = torch.device(spec.device)  # on CUDA: the one GPU Ray made visible to this actor
        self.group = join(spec.rendezvous, rank, device, store)
        self.model, report = load_shard(spec, rank, self.group.comm, device)
        return report

    # --- the commands ------------------------------------------------------------------------------
    def alloc_kv(self, cache: int, num_blocks: int, block_size: int) -> None:
        self.caches[cache] = self.model.allocate_kv_cache(num_blocks, block_size)

    def free_kv(self, cache: int) -> None:
        self.caches.pop(cache, None)

    def step(self, cache: int, inputs: StepInputs, count_experts: bool) -> torch.Tensor:
        return forward_logits(self.model, self.caches[cache], inputs, count_experts)

    def run(self, command: Command, cache: int, args: tuple[int, ...], inputs: StepInputs | None,
            count_experts: bool = False) -> torch.Tensor | None:
        if command is Command.ALLOC_KV:
            self.alloc_kv(cache, args[0], args[1])
        elif command is Command.FREE_KV:
            self.free_kv(cache)
        elif command is Command.STEP:
            return self.step(cache, inputs, count_experts)
        return None

    # --- rank 0 ------------------------------------------------------------------------------------
    def call(self, command: Command, cache: int = 0, args: tuple[int, ...] = (),
             inputs: StepInputs | None = None, count_experts: bool = False) -> torch.Tensor | None:
        """Every rank runs the command; rank 0 returns its result (a step's logits)."""
        payload = None
        if inputs is not None:
            args, payload = encode_step(inputs)
        self.group.channel.send(command, cache, args, payload)
        return self.run(command, cache, args, inputs, count_experts)

    # --- ranks 1..N-1 ------------------------------------------------------------------------------
    def loop(self) -> None:
        """Returns on SHUTDOWN; raises (after closing its connections, so rank 0 hears at once) on failure."""
        try:
            while True:
                command, cache, args, payload = self.group.channel.receive()
                if command is Command.SHUTDOWN:
                    return
                inputs = decode_step(args, payload) if command is Command.STEP else None
                # Rank 0 counts routed tokens for the whole group; the logits are its to sample.
                self.run(command, cache, args, inputs, count_experts=False)
        except BaseException:
            self.group.close()
            raise

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()
