"""The engine as the gateways (HTTP and gRPC) see it, and its in-process implementation."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from services.engine.async_engine import AsyncEngine, EngineDeadError
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams
from services.gateway.metrics import engine_snapshot
from services.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway must know about the model to admit requests without asking the engine."""

    source: str  # the preset name or checkpoint directory the engine loaded
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_experts: int
    created: int

    @classmethod
    def of(cls, engine: Any) -> ModelInfo:
        mc = engine.model.config
        return cls(str(engine.config.model), engine.max_model_len, mc.vocab_size, mc.num_layers,
                   mc.num_experts, int(time.time()))


@runtime_checkable
class StreamingEngineClient(Protocol):
    """What the gRPC front end needs from an engine, wherever it runs (EngineClient adds the rest
    the HTTP gateway uses).

    `generate` yields the request's `RequestOutput` increments, the last with `finished`; closing the
    iterator early should abort the request, and `abort` must as well (and ignore unknown ids: the
    gateway may abort a request that already finished). Failures are reported as: `ValueError` for a
    request that cannot be served, `QueueFullError` (services.gateway.errors) when it cannot be taken
    now, `EngineDeadError` when the engine is gone. `is_healthy` is read on every health check, so it
    must be cheap, and kept current by the client: requests are still attempted while it is False
    (the engine client, not a cached flag, decides that the engine is gone).
    """

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def is_healthy(self) -> bool: ...

    def generate(self, prompt_ids: Seq[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...


@runtime_checkable
class EngineClient(StreamingEngineClient, Protocol):
    """The engine as the front ends see it: in this process (LocalEngineClient), behind a Ray Serve
    handle (services.serve_app.ServeEngineClient) or vLLM's engine (services.vllm_plugin.engine_client)."""

    @property
    def model_info(self) -> ModelInfo: ...

    async def check_health(self) -> None:
        """Raise `EngineDeadError` when the engine cannot serve."""

    async def metrics_snapshot(self) -> dict[str, Any]:
        """`metrics.engine_snapshot` of the engine (drains its histogram samples)."""


class LocalEngineClient:
    """An `AsyncEngine` in this process (the engine replica itself, and tests)."""

    def __init__(self, engine: AsyncEngine, replica: str = "local"):
        self.engine = engine
        self.replica = replica
        self._info = ModelInfo.of(engine.engine)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def model_info(self) -> ModelInfo:
        return self._info

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

    async def metrics_snapshot(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._snapshot)

    def _snapshot(self) -> dict[str, Any]:
        # The step thread mutates the stats: read them between steps.
        return self.engine.read(lambda engine: engine_snapshot(engine, self.replica))

    async def shutdown(self) -> None:
        await self.engine.shutdown()
