"""A parallel group of N ranks serving one model instance (DESIGN.md, data flow 3 and 4).

Rank 0 is the engine process; ranks 1..N-1 are Ray actors (services/engine/worker.py) in one STRICT_PACK
placement group. The ranks share two torch.distributed backends, built without the process-wide default
group so that several groups can live in one process:
- `data` (NCCL on CUDA, gloo on CPU) carries the model's collectives (TorchDistComm, timed per step);
- `control` (always gloo, on the host) carries rank 0's step description: a fixed int64 header, then one
  flat int64 payload. Workers wait for the next header without a deadline (an idle engine is healthy);
  everything else has the collective timeout, so a dead peer (closed socket) or a stuck one (timeout)
  becomes an error on rank 0 in bounded time.

Legend: N ranks, T tokens in the step, B_d decode sequences, W decode block-table width, P prefill
chunks, S sampled rows.
"""
from __future__ import annotations

import contextlib
import datetime
import enum
import os
import socket
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from services.engine.config import EngineConfig
from services.engine.runner import StepInputs
from services.model.attention_metadata import AttentionMetadata, PrefillChunk

HEADER_SIZE = 8  # [command, cache id, payload length, then up to 5 command arguments]
NO_DEADLINE = datetime.timedelta(days=365)


class Command(enum.IntEnum):
    STEP = 1  # args (T, B_d, W, P, S); the payload follows
    ALLOC_KV = 2  # args (num_blocks, block_size): allocate the cache with this id on every rank
    FREE_KV = 3
    SHUTDOWN = 4


class ParallelGroupError(RuntimeError):
    """A rank died, stalled or failed: the group cannot run another step."""


# --- the step description ------------------------------------------------------------------------
def encode_step(inputs: StepInputs) -> tuple[tuple[int, ...], torch.Tensor]:
    """StepInputs -> (T, B_d, W, P, S) and one flat int64 payload; decode_step inverts it."""
    meta = inputs.meta
    num_decode, width = meta.decode_block_tables.shape
    chunks = meta.prefills
    # Per prefill chunk: query_start, query_len, context_len, block-table length; then all the tables.
    chunk_rows = [[c.query_start, c.query_len, c.context_len, int(c.block_table.numel())] for c in chunks]
    parts = [inputs.input_ids, inputs.positions, meta.slot_mapping, meta.decode_block_tables,
             meta.decode_context_lens, torch.tensor(chunk_rows, dtype=torch.int64),
             *(c.block_table for c in chunks), inputs.sample_indices]
    payload = torch.cat([p.reshape(-1).to(torch.int64, copy=False).cpu() for p in parts])
    args = (int(inputs.input_ids.numel()), int(num_decode), int(width), len(chunks),
            int(inputs.sample_indices.numel()))
    return args, payload


def decode_step(args: tuple[int, ...], payload: torch.Tensor) -> StepInputs:
    t, num_decode, width, num_chunks, num_sampled = args
    sizes = [t, t, t, num_decode * width, num_decode, 4 * num_chunks]
    fixed = list(torch.split(payload[:sum(sizes)], sizes))
    ids, positions, slots, tables, lens, chunk_rows = fixed
    rest = payload[sum(sizes):]
    rows = chunk_rows.view(num_chunks, 4).tolist()
    chunks = []
    for query_start, query_len, context_len, table_len in rows:
        chunks.append(PrefillChunk(query_start, query_len, context_len, rest[:table_len]))
        rest = rest[table_len:]
    if rest.numel() != num_sampled:
        raise ParallelGroupError(f"malformed step payload: {rest.numel()} sample indices, "
                                 f"expected {num_sampled}")
    meta = AttentionMetadata(slots, tables.view(num_decode, width), lens, tuple(chunks))
    return StepInputs(ids, positions, meta, rest)


class StepChannel:
    """Rank 0 broadcasts commands over the control backend; the other ranks receive them in order."""

    def __init__(self, control: dist.ProcessGroupGloo, rank: int, timeout: datetime.timedelta):
        self.control, self.rank, self.timeout = control, rank, timeout
        self.seconds = 0.0  # rank 0: time spent broadcasting, read and reset by the runner

    def _broadcast(self, tensor: torch.Tensor, timeout: datetime.timedelta) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.timeout = 0, timeout
        self.control.broadcast([tensor], opts).wait()

    def send(self, command: Command, cache: int = 0, args: tuple[int, ...] = (),
             payload: torch.Tensor | None = None) -> None:
        started = time.perf_counter()
        size = 0 if payload is None else int(payload.numel())
        header = torch.tensor([int(command), cache, size, *args, *[0] * (HEADER_SIZE - 3 - len(args))],
                              dtype=torch.int64)
        self._broadcast(header, self.timeout)
        if size:
            self._broadcast(payload.contiguous(), self.timeout)
        self.seconds += time.perf_counter() - started

    def receive(self) -> tuple[Command, int, tuple[int, ...], torch.Tensor | None]:
        header = torch.empty(HEADER_SIZE, dtype=torch.int64)
        self._broadcast(header, NO_DEADLINE)  # idle engines send nothing; a dead rank 0 closes the socket
        command, cache, size, *args = header.tolist()
        payload = None
        if size:
            payload = torch.empty(size, dtype=torch.int64)
            self._broadcast(payload, self.timeout)
        return Command(command), cache, tuple(args), payload


# --- the model's collectives -----------------------------------------------------------------------
class CollectiveTimer:
    """Seconds spent inside collectives since the last `take()`.

    CPU collectives block, so wall time around them is exact. On CUDA they are asynchronous: events on
    the current stream bracket them and are read at `take()`, once the step's work has finished."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._started = 0.0
        self._start_event = None

    def __enter__(self) -> None:
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start_event, end))
        else:
            self._seconds += time.perf_counter() - self._started

    def take(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()  # the sampler would wait for the step right after anyway
        seconds = self._seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        self._seconds, self._events = 0.0, []
        return seconds


class TorchDistComm:
    """The model's Comm (services/model/shard.py) over a torch.distributed backend, timed."""

    def __init__(self, backend, size: int, device: torch.device):
        self.backend, self.size = backend, size
        self.timer = CollectiveTimer(device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        with self.timer:
            self.backend.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        with self.timer:
            self.backend.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        """Rows of x [sum(input_splits), ...] sent in order, input_splits[r] of them to rank r."""
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        with self.timer:
            self.backend.alltoall_base(out, x.contiguous(), output_splits, input_splits).wait()
        return out


# --- joining -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendezvous:
    """Where and how the ranks meet: rank 0's store address and the deadlines."""

    host: str
    port: int
    size: int
    use_nccl: bool
    collective_timeout_s: float
    connect_timeout_s: float = 300.0


@dataclass
class RankGroup:
    """One rank's view of the group: its backends, the model's Comm and the step channel."""

    rank: int
    size: int
    control: dist.ProcessGroupGloo
    data: object
    comm: TorchDistComm
    channel: StepChannel
    store: dist.Store

    def close(self) -> None:
        """Close this rank's connections, so that peers blocked on it fail now rather than at a timeout.

        Gloo closes its sockets only when the backend is destroyed (abort() alone leaves peers waiting),
        so every reference to the backends is dropped; the group is unusable afterwards."""
        for backend in {id(self.data): self.data, id(self.control): self.control}.values():
            if backend is not None:
                with contextlib.suppress(RuntimeError):
                    backend.abort()
        self.comm.backend = None
        self.channel.control = None
        self.control = self.data = None


def listen_socket(host: str) -> socket.socket:
    """A listening socket on a free port of `host` only, handed to the store (which would bind every
    interface if it picked the port itself)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def master_store(rdv: Rendezvous, sock: socket.socket) -> dist.TCPStore:
    """The store serves on `sock` and owns it from here on (it closes the descriptor when destroyed)."""
    try:
        store = dist.TCPStore(rdv.host, rdv.port, rdv.size, True, timeout=_seconds(rdv.connect_timeout_s),
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()
    return store


def join(rdv: Rendezvous, rank: int, device: torch.device, store: dist.Store | None = None) -> RankGroup:
    """Blocks until every rank has joined. Rank 0 passes the master store; the others connect to it."""
    if store is None:
        store = dist.TCPStore(rdv.host, rdv.port, rdv.size, False, timeout=_seconds(rdv.connect_timeout_s))
    # The constructors rendezvous under the connect deadline; collectives then use the shorter one.
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _seconds(rdv.connect_timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=rdv.host)]
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, rdv.size, opts)
    control.set_timeout(_seconds(rdv.collective_timeout_s))
    if rdv.use_nccl:
        if device.index is None:  # "cuda": the GPU Ray made visible, or the process's current one
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = _seconds(rdv.collective_timeout_s)
        data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, rdv.size, nccl_opts)
    else:
        data = control  # on CPU one gloo backend serves both: commands and collectives never overlap
    channel = StepChannel(control, rank, _seconds(rdv.collective_timeout_s))
    return RankGroup(rank, rdv.size, control, data, TorchDistComm(data, rdv.size, device), channel, store)


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


# --- the group, from rank 0 ------------------------------------------------------------------------
def _ray():
    import ray  # only the engine process of a parallel group needs Ray

    return ray


@dataclass(frozen=True)
class Placement:
    """Where the worker actors go: a placement group and the bundle of each rank."""

    group: object  # ray.util.placement_group.PlacementGroup
    owned: bool  # created here (removed at shutdown) rather than the replica's own
    holder: object | None = None  # on GPU, an idle actor holding rank 0's bundle and reporting its GPU


def place(size: int, use_gpu: bool, timeout_s: float) -> Placement:
    """The current placement group when this process runs in one (a Serve replica that declared
    `placement_group_bundles`: bundle 0 is its own), else a new STRICT_PACK one pinned to this node."""
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
    pg = placement_group([{**bundle, **node}] + [dict(bundle)] * (size - 1), strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise ParallelGroupError(f"no node can hold {size} bundles of {bundle} (STRICT_PACK) within "
                                 f"{timeout_s:.0f} s; free: {ray.available_resources()}") from None
    holder = None
    if use_gpu:
        from services.engine.worker import BundleHolder
        holder = _actor(BundleHolder, pg, 0).remote()
    return Placement(pg, owned=True, holder=holder)


def _actor(cls, pg, bundle: int):
    """An actor class bound to one bundle, taking that bundle's CPUs and GPUs (whoever declared it)."""
    ray = _ray()
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
    spec = pg.bundle_specs[bundle]
    # A second thread lets probes (pid, node_ip) answer while serve() occupies the first.
    return ray.remote(cls).options(scheduling_strategy=strategy, max_restarts=0, max_concurrency=2,
                                   num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0))


class ParallelGroup:
    """Rank 0's handle on the group: its model shard, the worker actors and the step channel."""

    def __init__(self, rank0: RankGroup, model, workers: list, placement: Placement, load_reports: tuple,
                 collective_timeout_s: float):
        self.rank0, self.model, self.workers = rank0, model, workers
        self.load_reports = load_reports  # one LoadReport per rank, rank 0 first
        self.collective_timeout_s = collective_timeout_s
        self.error: ParallelGroupError | None = None
        self.placement = placement
        self._loops: list = []
        self._finalizer = weakref.finalize(self, _release, rank0, workers, placement)

    @property
    def size(self) -> int:
        return self.rank0.size

    @property
    def comm(self) -> TorchDistComm:
        return self.rank0.comm

    @classmethod
    def start(cls, config: EngineConfig) -> ParallelGroup:
        """EngineConfig with parallel_size > 1 -> workers started, every rank's shard loaded."""
        # worker.py imports this module, so it is imported here rather than at the top.
        from services.engine.worker import RankSpec, RankWorker, load_shard

        ray = _ray()
        if not ray.is_initialized():
            ray.init()
        size, device = config.parallel_size, torch.device(config.device)
        use_gpu = device.type == "cuda"
        placement = place(size, use_gpu, timeout_s=120.0)
        workers = [_actor(RankWorker, placement.group, rank).remote() for rank in range(1, size)]
        rank0 = None
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
            rank0 = join(rdv, 0, device, store)
            model, report0 = load_shard(spec, 0, rank0.comm, device)
            reports = (report0, *ray.get(setups))
        except BaseException:
            _release(rank0, workers, placement)
            raise
        group = cls(rank0, model, workers, placement, reports, config.collective_timeout_s)
        group._loops = [w.serve.remote() for w in workers]
        return group

    # --- commands --------------------------------------------------------------------------------
    def send(self, command: Command, cache: int = 0, args: tuple[int, ...] = (),
             payload: torch.Tensor | None = None) -> None:
        if self.error is not None:
            raise self.error
        try:
            self.rank0.channel.send(command, cache, args, payload)
        except Exception as exc:
            raise self.fail(exc) from exc

    def broadcast_step(self, cache: int, inputs: StepInputs) -> None:
        args, payload = encode_step(inputs)
        self.send(Command.STEP, cache, args, payload)

    def fail(self, cause: BaseException) -> ParallelGroupError:
        """Rank 0's side of a failed step: close the connections (live workers leave their collectives at
        once) and name what the workers reported."""
        if self.error is not None:
            return self.error
        self.rank0.close()
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
                self.rank0.channel.send(Command.SHUTDOWN)
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
