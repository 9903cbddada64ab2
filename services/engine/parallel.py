"""How the N ranks of a parallel group talk (DESIGN.md, data flow 3 and 4): joining, the model's
collectives, and the commands rank 0 broadcasts.

Rank 0 is the engine process; ranks 1..N-1 are Ray actors (services/engine/rank.py runs every rank;
services/engine/parallel_runner.py starts the group). The ranks share two torch.distributed backends,
built without the process-wide default group so that several groups can live in one process:
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
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address(rdv.host))]
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


def local_address(peer: str) -> str:
    """This host's address on the route to `peer` (rank 0's store), which gloo binds and advertises to the
    other ranks: on a group that spans nodes rank 0's own address exists only on rank 0's node."""
    if peer in ("127.0.0.1", "localhost"):
        return peer
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((peer, 9))  # a UDP connect only picks the route; nothing is sent
        return sock.getsockname()[0]


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)
