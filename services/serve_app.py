"""The Ray Serve application: an HTTP gateway deployment in front of an engine deployment.

    client --HTTP--> GrokGateway (FastAPI, tokenizes, validates) --DeploymentHandle, streaming--> GrokEngine

One engine replica is one model instance holding an `AsyncEngine`; Serve queues, limits
(`max_ongoing_requests`, `max_queued_requests`), autoscales and health-checks the replicas. The gateway
streams each request's outputs from the engine through `handle.options(stream=True)`; when the client
goes away the gateway cancels that call, the replica's generator is cancelled and the engine aborts
the request.

Entry points: `build_app(args)` for `serve run services.serve_app:build_app config=deploy/local-cpu.yaml`
or a Serve config file's `import_path`, and `build_application(AppConfig)` for code
(`grok-serve up`, tests).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from services.engine.api import EngineDeadError, EngineUnavailableError, ModelInfo, QueueFullError
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams
from services.gateway.config import AppConfig, load_config
from services.gateway.metrics import ReplicaSeries
from services.gateway.openai_api import build_context, create_app
from services.model.tokenizer import Tokenizer, load_tokenizer
from services.serve_metrics import DEFAULT_PUBLISH, Publisher, PublishOptions, registry

# /metrics waits at most this long for the engine's numbers (less when engine_call_timeout_s is
# shorter), then answers with the last ones: well within any scrape timeout, so a saturated engine
# shows up as stale numbers and scrape errors, never as a gateway that does not answer.
SCRAPE_WAIT_S = 5.0
# A gateway's numbers are a few counters, and a drain waits for every gateway to hear of it: publish often.
GATEWAY_PUBLISH = PublishOptions(period_s=0.5)

logger = logging.getLogger(__name__)

_UNAVAILABLE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, TaskCancelledError)


def _translate(exc: Exception) -> Exception:
    """Ray's failure types to the engine contract's (services/engine/api.py): the one translation
    between the gateway and the engine replicas."""
    if isinstance(exc, BackPressureError):
        # Ray's own message names its internals (num_queued_requests=...): clients get ours.
        return QueueFullError("the engine's request queue is full", exc.retry_after_s)
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, ValueError):  # RequestRejected keeps its param and code across Ray
            return cause
        if isinstance(cause, EngineDeadError):
            return EngineUnavailableError(str(cause))
        return RuntimeError(f"engine call failed: {cause!r}")
    if isinstance(exc, _UNAVAILABLE):
        return EngineUnavailableError(f"engine replica unavailable: {type(exc).__name__}")
    return exc


class ServeEngineClient:
    """`EngineClient` over the engine deployment's handle."""

    def __init__(self, handle: DeploymentHandle, info: ModelInfo, tokenizer: Tokenizer, timeout_s: float,
                 app_name: str | None = None, publish: PublishOptions = DEFAULT_PUBLISH):
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._info = info
        self._tokenizer = tokenizer
        self._timeout_s = timeout_s
        self._healthy = True  # last known: refreshed by check_health and by failed calls
        self._active: dict[str, Any] = {}
        self._last_output = float("-inf")  # monotonic time of the last output any stream received
        self._app_name, self._publish = app_name, publish  # app_name None: no registry, one replica
        self._registry: Any = None
        self.draining = False

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def start_drain(self) -> None:
        """Refuse new requests (503, gRPC UNAVAILABLE) and report unhealthy; streams already running go on."""
        self.draining = True

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def is_healthy(self) -> bool:
        return self._healthy and not self.draining

    async def generate(self, prompt_ids: Seq[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self.draining:
            raise EngineUnavailableError("the server is shutting down: retry on another replica")
        response = self._stream.generate.remote(list(prompt_ids), params, request_id)
        self._active[request_id] = response
        finished = False
        try:
            async for out in response:
                finished = out.finished
                self._last_output = time.monotonic()
                yield out
        except Exception as exc:
            translated = _translate(exc)
            if isinstance(translated, EngineDeadError):
                self._healthy = False
                self._last_output = float("-inf")
            raise translated from exc
        finally:
            self._active.pop(request_id, None)
            if not finished:
                # The replica's generator is cancelled; its finally makes the engine abort the request.
                _cancel(response)

    async def abort(self, request_id: str) -> None:
        response = self._active.get(request_id)
        if response is not None:
            _cancel(response)

    async def check_health(self) -> None:
        if self.draining:
            raise EngineUnavailableError("the server is shutting down")
        # A saturated engine queues this call behind generation requests (every call counts against
        # max_ongoing_requests): outputs streaming in right now prove it is alive without asking.
        if self._active and time.monotonic() - self._last_output < self._timeout_s:
            self._healthy = True
            return
        try:
            await asyncio.wait_for(self._handle.health.remote(), self._timeout_s)
        except BackPressureError:
            self._healthy = True  # alive, only busy: its queue is full
            return
        except asyncio.TimeoutError:
            self._healthy = False
            raise EngineUnavailableError(f"the engine did not answer within {self._timeout_s} s") from None
        except Exception as exc:
            self._healthy = False
            translated = _translate(exc)
            raise (translated if isinstance(translated, EngineDeadError)
                   else EngineUnavailableError(str(translated))) from exc
        self._healthy = True

    async def metrics_snapshot(self) -> dict[str, Any]:
        """Every engine replica's numbers as the registry has them, the replica the handle reaches with
        current ones; and the other gateways' counters (the collection GatewayMetrics.fold takes)."""
        wait_s = min(SCRAPE_WAIT_S, self._timeout_s)
        direct = asyncio.ensure_future(asyncio.wait_for(self._handle.metrics_snapshot.remote(), wait_s))
        try:
            collected = await asyncio.wait_for(self._collect(), wait_s)
        except Exception:
            direct.cancel()
            raise
        try:
            fresh = await direct
        except Exception:  # busy or gone: the registry's numbers stand, with their age
            logger.debug("no direct engine snapshot", exc_info=True)
            return collected
        engines = [e for e in collected["engines"] if e.get("replica") != fresh.get("replica")]
        return {**collected, "engines": [*engines, {**fresh, "age_s": 0.0}]}

    async def _collect(self) -> dict[str, Any]:
        if self._app_name is None:
            return {"engines": [], "gateways": []}
        if self._registry is None:
            self._registry = await asyncio.to_thread(registry, self._app_name, self._publish)
        try:
            return await self._registry.collect.remote()
        except RayActorError:
            self._registry = None
            raise


def _cancel(response: Any) -> None:
    try:
        response.cancel()
    except Exception:  # a call that failed to be assigned re-raises that failure here
        logger.debug("cancel of a failed engine call", exc_info=True)


def _app_name() -> str | None:
    try:
        return serve.get_replica_context().replica_id.deployment_id.app_name
    except Exception:  # noqa: BLE001 - outside a replica: nothing to publish to
        return None


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (direct construction in tests)
        return uuid.uuid4().hex[:8]


@serve.deployment(name="GrokEngine")
class EngineDeployment:
    """One model instance. With engine.parallel_size > 1 the deployment reserves a placement group
    (engine.placement_strategy) whose bundles hold the other ranks (see `engine_options`); this process
    is rank 0."""

    def __init__(self, config: AppConfig):
        # torch and the model load here, not in the gateway.
        if config.engine.backend == "vllm":
            from services.vllm_plugin.engine_client import VllmEngineClient

            self._client = VllmEngineClient(config.engine, replica=_replica_id())
        else:
            from services.engine.async_engine import AsyncEngine, LocalEngineClient
            from services.engine.engine import LLMEngine

            self._client = LocalEngineClient(AsyncEngine(LLMEngine(config.engine)), replica=_replica_id())

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        # Cancelling this call (client gone) closes the engine's stream, which aborts the request.
        async for out in self._client.generate(prompt_ids, params, request_id):
            yield out

    def model_info(self) -> ModelInfo:
        _publishing(self)
        return self._client.model_info

    async def metrics_snapshot(self) -> dict[str, Any]:
        """This replica's numbers, cumulative (ReplicaSeries.to_snapshot): a gateway's scrape and the
        publisher both read them, so neither may take samples away from the other."""
        series = _publishing(self)
        series.fold(await self._client.metrics_snapshot())
        return series.to_snapshot()

    async def health(self) -> None:
        await self._client.check_health()

    async def check_health(self) -> None:
        # Serve calls this periodically; raising marks the replica unhealthy and it is replaced.
        _publishing(self)
        await self._client.check_health()

    async def __del__(self) -> None:
        # Serve has already let in-flight requests finish (graceful_shutdown_timeout_s).
        publisher = getattr(self, "_publisher", None)
        if publisher is not None:
            await publisher.stop()
        await self._client.shutdown()


def _publishing(engine: EngineDeployment) -> ReplicaSeries:
    """The replica's cumulative series, publishing to the registry from the first call on (Serve's
    first health check, or the gateway asking for the model): the constructor only loads the model."""
    series = getattr(engine, "_series", None)
    if series is None:
        replica = _replica_id()
        series = engine._series = ReplicaSeries(replica)
        app_name = _app_name()
        if app_name is not None:
            engine._publisher = Publisher(app_name, "engine", replica, engine.metrics_snapshot)
            engine._publisher.start()
    return series


@serve.deployment(name="GrokGateway")
@serve.ingress()
class GatewayDeployment:
    async def __init__(self, engine: DeploymentHandle, config: AppConfig):
        info: ModelInfo = await engine.model_info.remote()
        model_dir = Path(info.source) if Path(info.source).is_dir() else None
        tokenizer = load_tokenizer(model_dir, info.vocab_size)
        app_name, gateway = _app_name(), _replica_id()
        client = ServeEngineClient(engine, info, tokenizer, config.engine_call_timeout_s, app_name)
        self._context = build_context(config, client)
        # Published with every engine replica's numbers, so any gateway can answer a scrape for all.
        self._context.metrics.gateway = gateway

        async def numbers() -> dict[str, Any]:
            return {"gateway": gateway, "counters": self._context.metrics.own.state(),
                    "in_flight": client.in_flight, "draining": client.draining}

        self._publisher = None
        if app_name is not None:
            self._publisher = Publisher(app_name, "gateway", gateway, numbers, GATEWAY_PUBLISH,
                                        on_drain=client.start_drain)
            self._publisher.start()
        self._grpc = None
        if config.grpc_port is not None:
            # The gRPC front end (services/gateway/grpc_server.py) shares this process and engine
            # client; it is imported only when configured.
            from services.gateway.grpc_server import build_grpc_server

            keys = self._context.keys.keys or None
            self._grpc = build_grpc_server(client, tokenizer, keys, config.host, config.grpc_port,
                                           limits=config.limits, settings=config.grpc,
                                           retry_after_s=config.retry_after_s)
            await self._grpc.start()

    def __serve_build_asgi_app__(self):
        return create_app(self._context, echo_request_id=False)

    async def __del__(self) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
        if self._grpc is not None:
            await self._grpc.stop(self._context.config.gateway_deployment.graceful_shutdown_timeout_s)


def engine_options(config: AppConfig) -> dict[str, Any]:
    d = config.engine_deployment
    options: dict[str, Any] = {
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "max_surge_percent": d.max_surge_percent,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
    }
    if d.autoscaling is not None:
        options["autoscaling_config"] = d.autoscaling.to_serve()
    else:
        options["num_replicas"] = d.num_replicas
    if d.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = d.max_replicas_per_node
    ranks = config.engine.parallel_size
    if ranks > 1:
        # Rank 0 runs in the replica (bundle 0); ranks 1.. are actors placed in the other bundles.
        options["placement_group_bundles"] = [{"CPU": d.num_cpus, "GPU": d.num_gpus}] * ranks
        options["placement_group_strategy"] = config.engine.placement_strategy
    return options


def gateway_options(config: AppConfig) -> dict[str, Any]:
    g = config.gateway_deployment
    return {"num_replicas": g.num_replicas, "max_ongoing_requests": g.max_ongoing_requests,
            "graceful_shutdown_timeout_s": g.graceful_shutdown_timeout_s,
            "ray_actor_options": {"num_cpus": g.num_cpus}}


def build_application(config: AppConfig) -> serve.Application:
    engine = EngineDeployment.options(**engine_options(config)).bind(config)
    return GatewayDeployment.options(**gateway_options(config)).bind(engine, config)


def build_app(args: Mapping[str, Any] | None = None) -> serve.Application:
    """Serve's app builder: `config` names a YAML file; every other key overrides an option (dotted
    keys reach nested sections: `engine.max_model_len=512`)."""
    args = dict(args or {})
    path = args.pop("config", None)
    return build_application(load_config(path, args))
