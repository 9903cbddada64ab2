"""The engine behind an asyncio API: `generate` streams a request's outputs, `abort` cancels it; and
`LocalEngineClient`, the engine client (services/engine/api.py) over it in this process.

One background task drives the loop; each step runs in a worker thread so the event loop keeps
serving. New requests and aborts are queued and applied by that thread between steps, so the engine
is only ever touched from one thread at a time. The loop sleeps while there is nothing to do. A loop
that fails fails every request with `EngineDeadError` until the engine is replaced.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from typing import Any

from services.engine.api import EngineDeadError, ModelInfo
from services.engine.engine import LLMEngine
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams
from services.model.tokenizer import Tokenizer


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._commands: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    @property
    def is_healthy(self) -> bool:
        return self.error is None and (self._task is None or not self._task.done())

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def _start(self) -> None:
        if self._task is None or self._task.done() and self.error is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = self._loop.create_task(self._run(), name="grok-serve-engine-loop")

    async def generate(self, prompt_ids: Seq[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream the request's increments; the last has `finished`. Leaving the iteration early
        (a client that went away) aborts the request and frees its KV blocks."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error!r}")
        self._start()
        self.engine.validate(prompt_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Compiled here, in a worker thread: a slow grammar delays only its own request, a bad one is
        # rejected before anything is queued.
        grammar = (None if params.structured_output is None
                   else await asyncio.to_thread(self.engine.compile_grammar, params))
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.append(("add", request_id, list(prompt_ids), params, grammar))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self._commands.append(("abort", request_id))
                if self._wake is not None:
                    self._wake.set()

    def read(self, fn):
        """fn(engine) while no step runs: a consistent view of the engine's state and statistics."""
        with self._lock:
            return fn(self.engine)

    async def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        if self._wake is not None:
            self._wake.set()

    def _apply_commands(self) -> list[tuple[str, BaseException]]:
        rejected = []
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, request_id, prompt_ids, params, grammar = command
                try:
                    self.engine.add_request(request_id, prompt_ids, params, grammar=grammar)
                except ValueError as exc:
                    rejected.append((request_id, exc))
            else:
                self.engine.abort_request(command[1])
        return rejected

    def _step(self) -> tuple[list[RequestOutput], list[tuple[str, BaseException]]]:
        with self._lock:
            rejected = self._apply_commands()
            outputs = self.engine.step() if self.engine.has_unfinished() else []
            return outputs, rejected

    async def _run(self) -> None:
        try:
            while True:
                if not self._commands and not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                outputs, rejected = await asyncio.to_thread(self._step)
                for request_id, exc in rejected:
                    stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        stream.put_nowait(exc)
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put_nowait(out)
                        if out.finished:
                            del self._streams[out.request_id]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every in-flight request must hear of it
            self.error = exc
            dead = EngineDeadError(f"the engine stopped: {exc!r}")
            for stream in self._streams.values():
                stream.put_nowait(dead)
            self._streams.clear()

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class LocalEngineClient:
    """An `AsyncEngine` in this process (the engine replica itself, and tests) as an `EngineClient`."""

    def __init__(self, engine: AsyncEngine, replica: str = "local"):
        self.engine = engine
        self.replica = replica

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.engine.model_info

    @property
    def is_healthy(self) -> bool:
        return self.engine.is_healthy

    def generate(self, prompt_ids: Seq[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(prompt_ids, params, request_id)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        if not self.engine.is_healthy:
            raise EngineDeadError(f"the engine stopped: {self.engine.error!r}")
        group = self.engine.engine.group
        if group is not None:
            try:
                group.check_workers()
            except Exception as exc:  # whatever the group reports, the engine cannot serve
                raise EngineDeadError(f"the engine stopped: {exc!r}") from exc

    async def metrics_snapshot(self) -> dict[str, Any]:
        # The step thread mutates the statistics: read them between steps.
        return await asyncio.to_thread(self.engine.read, lambda engine: engine.metrics_snapshot(self.replica))

    async def shutdown(self) -> None:
        await self.engine.shutdown()
