"""A parallel group from rank 0: starting it (placement group, rank actors, rendezvous, shards), driving
it, and failing it in bounded time; and `ParallelRunner`, the engine's runner over the group.

Every rank runs the same forward (the collectives need them all); only rank 0 samples. The KV caches
live on every rank (each its own kv heads) under a cache id: the engine's, and a scratch one for `score`.
Legend: S sampled rows, V vocabulary, N ranks, E experts, L layers.
"""
from __future__ import annotations

import contextlib
import os
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from services.engine.config import EngineConfig
from services.engine.parallel import (
    Command,
    ParallelGroupError,
    RankGroup,
    Rendezvous,
    StepChannel,
    TorchDistComm,
    listen_socket,
    master_store,
)
from services.engine.rank import Rank, RankSpec
from services.engine.runner import ModelRunner, StepInputs
from services.engine.scheduler import SchedulerOutput
from services.engine.stats import EngineStats
from services.model.attention_metadata import AttentionMetadata

ENGINE_CACHE, SCRATCH_CACHE = 0, 1


def _ray():
    import ray  # only the engine process of a parallel group needs Ray

    return ray


@dataclass(frozen=True)
class Placement:
    """Where the worker actors go: a placement group and the bundle of each rank."""

    group: object  # ray.util.placement_group.PlacementGroup
    owned: bool  # created here (removed at shutdown) rather than the replica's own
    holder: object | None = None  # on GPU, an idle actor holding rank 0's bundle and reporting its GPU


def place(size: int, use_gpu: bool, timeout_s: float, strategy: str = "STRICT_PACK") -> Placement:
    """The current placement group when this process runs in one (a Serve replica that declared
    `placement_group_bundles`: bundle 0 is its own), else a new one of `strategy` whose bundle 0 is
    pinned to this node."""
    ray = _ray()
    from ray.util.placement_group import get_current_placement_group, placement_group

    current = get_current_placement_group()
    if current is not None:
        if len(current.bundle_specs) < size:
            raise ValueError(f"the replica's placement group has {len(current.bundle_specs)} bundles; a "
                             f"parallel size of {size} needs one per rank")
        return Placement(current, owned=False)
    # Fractional CPUs: the ranks mostly wait on each other, and small hosts must still fit a group.
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 0.25}
    node = {f"node:{ray.util.get_node_ip_address()}": 0.001}  # rank 0 lives on this node
    pg = placement_group([{**bundle, **node}] + [dict(bundle)] * (size - 1), strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise ParallelGroupError(f"the cluster cannot place {size} bundles of {bundle} ({strategy}) within "
                                 f"{timeout_s:.0f} s; free: {ray.available_resources()}") from None
    holder = None
    if use_gpu:
        holder = _actor(BundleHolder, pg, 0).remote()
    return Placement(pg, owned=True, holder=holder)


def _actor(cls, pg, bundle: int):
    """An actor class bound to one bundle, taking that bundle's CPUs and GPUs (whoever declared it)."""
    ray = _ray()
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
    spec = pg.bundle_specs[bundle]
    # A second thread lets probes (pid, node_ip) answer while loop() occupies the first.
    return ray.remote(cls).options(scheduling_strategy=strategy, max_restarts=0, max_concurrency=2,
                                   num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0))


class BundleHolder:
    """Holds rank 0's GPU bundle for an engine process that runs outside the placement group, and
    says which GPU that bundle got."""

    def gpu_id(self) -> int:
        import ray

        return int(ray.get_gpu_ids()[0])


class ParallelGroup:
    """Rank 0's handle on the group: its own `Rank` (model shard, caches, step channel) and the worker
    actors, which are `Rank`s too."""

    def __init__(self, rank0: Rank, workers: list, placement: Placement, load_reports: tuple,
                 collective_timeout_s: float):
        self.rank0, self.model, self.workers = rank0, rank0.model, workers
        self.size: int = rank0.group.size
        self.comm: TorchDistComm = rank0.group.comm  # the model's collectives, timed
        self.channel: StepChannel = rank0.group.channel  # rank 0's end of the step broadcast
        self.load_reports = load_reports  # one LoadReport per rank, rank 0 first
        self.collective_timeout_s = collective_timeout_s
        self.error: ParallelGroupError | None = None
        self.placement = placement
        self._loops: list = []
        self._finalizer = weakref.finalize(self, _release, rank0.group, workers, placement)

    @classmethod
    def start(cls, config: EngineConfig) -> ParallelGroup:
        """EngineConfig with parallel_size > 1 -> workers started, every rank's shard loaded."""
        ray = _ray()
        if not ray.is_initialized():  # as `grok-serve up`: RAY_ADDRESS's cluster, else one of our own
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
        size, device = config.parallel_size, torch.device(config.device)
        use_gpu = device.type == "cuda"
        placement = place(size, use_gpu, timeout_s=120.0, strategy=config.placement_strategy)
        workers = [_actor(Rank, placement.group, rank).remote() for rank in range(1, size)]
        rank0 = Rank()
        try:
            # Actors that cannot even start fail here, before anyone waits on a rendezvous.
            here = ray.util.get_node_ip_address()
            ips = ray.get([w.node_ip.remote() for w in workers], timeout=300.0)
            host = "127.0.0.1" if all(ip == here for ip in ips) else here
            if placement.holder is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
                device = torch.device("cuda", int(ray.get(placement.holder.gpu_id.remote())))
            sock = listen_socket(host)
            rdv = Rendezvous(host, sock.getsockname()[1], size, use_gpu, config.collective_timeout_s)
            store = master_store(rdv, sock)  # owns the socket from here on
            spec = RankSpec(rdv, config.model, config.dtype, config.load_format, config.seed,
                            "cuda" if use_gpu else config.device)
            setups = [w.setup.remote(spec, rank) for rank, w in enumerate(workers, start=1)]
            report0 = rank0.setup(spec, 0, store, device)
            reports = (report0, *ray.get(setups))
        except BaseException:
            _release(rank0.group, workers, placement)
            raise
        group = cls(rank0, workers, placement, reports, config.collective_timeout_s)
        group._loops = [w.loop.remote() for w in workers]
        return group

    def call(self, command: Command, cache: int = 0, args: tuple[int, ...] = (),
             inputs: StepInputs | None = None, count_experts: bool = False) -> torch.Tensor | None:
        """Run a command on every rank (Rank.call); a failure anywhere fails the group."""
        if self.error is not None:
            raise self.error
        try:
            return self.rank0.call(command, cache, args, inputs, count_experts)
        except Exception as exc:  # a peer died or stalled inside a collective, or this rank failed
            raise self.fail(exc) from exc

    def check_workers(self) -> None:
        """Raises the group's error if it failed, or fails it if a worker's loop has ended (its process
        or node lost). Health checks call it, so a group that lost a rank while idle is replaced before
        a request meets it; a step would only find out inside its first collective."""
        if self.error is None and self._loops:
            done, _ = _ray().wait(self._loops, num_returns=len(self._loops), timeout=0)
            if done:
                raise self.fail(RuntimeError("a worker's loop ended while the group was idle"))
        if self.error is not None:
            raise self.error

    def fail(self, cause: BaseException) -> ParallelGroupError:
        """Rank 0's side of a failed step: close the connections (live workers leave their collectives at
        once) and name what the workers reported."""
        if self.error is not None:
            return self.error
        self.rank0.group.close()
        ray = _ray()
        done = []
        if self._loops:
            done, _ = ray.wait(self._loops, num_returns=len(self._loops),
                               timeout=min(5.0, self.collective_timeout_s))
        reasons = []
        for rank, loop in enumerate(self._loops, start=1):
            if loop not in done:
                reasons.append(f"rank {rank}: no report (stalled or still unwinding)")
                continue
            try:
                ray.get(loop)
                reasons.append(f"rank {rank}: left its loop")
            except Exception as exc:  # noqa: BLE001 - the worker's error is the diagnosis
                error = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc  # unwrapped
                reasons.append(f"rank {rank}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
        self.error = ParallelGroupError(f"parallel group of {self.size} failed ({type(cause).__name__}: "
                                        f"{str(cause)[:300]}); " + "; ".join(reasons))
        return self.error

    def shutdown(self) -> None:
        """End the workers' loops (when they can still hear it) and release actors and placement group."""
        if self.error is None and self._loops:
            with contextlib.suppress(Exception):  # shutting down either way
                self.channel.send(Command.SHUTDOWN)
                _ray().get(self._loops, timeout=self.collective_timeout_s)
            self.error = ParallelGroupError("the parallel group was shut down")
        self._finalizer()


def _release(rank0: RankGroup | None, workers: list, placement: Placement) -> None:
    ray = _ray()
    if rank0 is not None:
        rank0.close()
    if ray.is_initialized():
        for actor in [*workers, placement.holder]:
            if actor is not None:
                with contextlib.suppress(Exception):  # already gone
                    ray.kill(actor)
        if placement.owned:
            with contextlib.suppress(Exception):  # already gone
                ray.util.remove_placement_group(placement.group)


class ParallelRunner(ModelRunner):
    def __init__(self, group: ParallelGroup, num_blocks: int, block_size: int,
                 stats: EngineStats | None = None):
        self.group, self.stats = group, stats
        super().__init__(group.model, num_blocks, block_size)
        self.last_collective_s = 0.0
        self.last_broadcast_s = 0.0
        config = group.model.config
        # Expert e lives on rank e mod N (services/model/shard.py): [E] -> rank, to count tokens per rank.
        self._rank_of_expert = torch.arange(config.num_experts, device=self.device) % group.size

    def _allocate_kv_cache(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.group.call(Command.ALLOC_KV, ENGINE_CACHE, (num_blocks, block_size))
        return self.group.rank0.caches[ENGINE_CACHE]

    def _run(self, cache: int, inputs: StepInputs, count_experts: bool) -> torch.Tensor:
        return self.group.call(Command.STEP, cache, inputs=inputs, count_experts=count_experts)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """float32 logits [S, V] for the entries of `step.sampled`, in order."""
        inputs = self.prepare(step)
        started = time.perf_counter()
        logits = self._run(ENGINE_CACHE, inputs, count_experts=True)
        self.last_forward_s = time.perf_counter() - started
        self.last_collective_s = self.group.comm.timer.take()
        channel = self.group.channel
        self.last_broadcast_s, channel.seconds = channel.seconds, 0.0
        if self.stats is not None:
            # The router is replicated, so rank 0's per-expert counts of this step are the group's.
            per_expert = self.model.expert_counts.sum(0)  # [E], reset by the engine after the step
            per_rank = torch.zeros(self.group.size, dtype=torch.int64, device=self.device)
            per_rank.index_add_(0, self._rank_of_expert, per_expert)
            self.stats.record_collectives(self.last_collective_s, self.last_broadcast_s, per_rank.tolist())
        return logits

    @torch.inference_mode()
    def score(self, token_ids, chunk_size: int | None = None) -> np.ndarray:
        """float32 logits [len, V] at every position of one sequence, computed by the whole group (the
        parallel counterpart of Grok1.score), in a scratch cache that leaves the engine's untouched."""
        config = self.model.config
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        n = int(ids.shape[0])
        if n == 0 or n > config.max_seq_len:
            raise ValueError(f"score needs 1..{config.max_seq_len} tokens, got {n}")
        if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {config.vocab_size})")
        block_size = self.block_size
        num_blocks = -(-n // block_size)
        table = torch.arange(num_blocks)
        self.group.call(Command.ALLOC_KV, SCRATCH_CACHE, (num_blocks, block_size))
        out = []
        step = chunk_size or n
        for start in range(0, n, step):
            end = min(n, start + step)
            meta = AttentionMetadata.for_single_sequence(start, end - start, table, block_size)
            inputs = StepInputs(ids[start:end], torch.arange(start, end), meta, torch.arange(end - start))
            out.append(self._run(SCRATCH_CACHE, inputs, count_experts=False))
        self.group.call(Command.FREE_KV, SCRATCH_CACHE)
        self.group.comm.timer.take()  # scoring is not an engine step: keep its time out of the stats
        self.group.channel.seconds = 0.0
        return torch.cat(out).cpu().numpy()

    def shutdown(self) -> None:
        self.group.shutdown()
