"""The gRPC API (`grok_serve.v1.Generation`, proto/grok_serve.proto) with health and reflection.

The servicer talks to the engine only through a `StreamingEngineClient` (services/engine/api.py), so
the same code serves an in-process `AsyncEngine` (`LocalEngineClient`) and a Ray Serve deployment
handle. Requests that can never be served are rejected (`admit`) before anything is queued; a call that ends early (cancelled, past its
deadline, connection lost) aborts its request so the engine frees the KV blocks at once.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.engine.api import (
    EngineDeadError,
    QueueFullError,
    Rejection,
    RequestLimits,
    RequestRejected,
    StreamingEngineClient,
    admit,
    check_limits,
    check_token_ids,
    check_truncation,
)
from services.engine.outputs import CompletionOutput, RequestOutput
from services.engine.sampling_params import SamplingParams
from services.engine.structured_output import StructuredOutput
from services.gateway.config import GrpcConfig
from services.gateway.proto import grok_serve_pb2 as pb
from services.gateway.proto import grok_serve_pb2_grpc as pb_grpc
from services.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Load balancers and Kubernetes probes must reach health without holding an API key.
_OPEN_METHOD_PREFIX = f"/{health.SERVICE_NAME}/"
# The trailer gRPC clients read as the server's retry pushback (gRFC A6).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

_OPTIONAL_PARAMS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "max_tokens", "min_tokens", "logprobs",
                    "skip_special_tokens", "priority")
_FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                   "abort": pb.FINISH_REASON_ABORT}


class _Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple = ()):
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers


def _status_of(exc: Exception, request_id: str | None, retry_after_s: float = 1.0) -> _Rejected:
    """The one translation of the engine contract's failures (services/engine/api.py) to gRPC;
    `retry_after_s` is the pushback when the engine names none."""
    if isinstance(exc, _Rejected):
        return exc
    if isinstance(exc, ValueError):  # RequestRejected, and whatever else a client could not accept
        return _Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, QueueFullError):
        retry = exc.retry_after_s if exc.retry_after_s is not None else retry_after_s
        trailers = ((RETRY_PUSHBACK_KEY, str(max(0, round(retry * 1000)))),)
        return _Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), trailers)
    if isinstance(exc, EngineDeadError):
        return _Rejected(grpc.StatusCode.UNAVAILABLE, str(exc))
    logger.error("request %s failed", request_id, exc_info=exc)
    return _Rejected(grpc.StatusCode.INTERNAL, f"internal error (request {request_id})")


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults; raises ValueError naming a bad field."""
    given = {name: getattr(msg, name) for name in _OPTIONAL_PARAMS if msg.HasField(name)}
    return SamplingParams(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
                          ignore_eos=msg.ignore_eos, structured_output=structured_output_from_proto(msg),
                          logit_bias=dict(msg.logit_bias), **given)


def structured_output_from_proto(msg: pb.SamplingParams) -> StructuredOutput | None:
    if not msg.HasField("structured_output"):
        return None
    so, param = msg.structured_output, "structured_output"
    kind = so.WhichOneof("kind")
    if kind is None:
        raise RequestRejected(Rejection("structured_output: set one of its kinds", param))
    if kind == "json_schema":
        return StructuredOutput.json_schema(so.json_schema, param)
    if kind == "json_object":
        return StructuredOutput.json_object(param)
    if kind == "choice":
        return StructuredOutput.choice(list(so.choice.choices), param)
    return StructuredOutput(kind, getattr(so, kind), param)


def _sequence_to_proto(out: CompletionOutput) -> pb.SequenceOutput:
    msg = pb.SequenceOutput(index=out.index, token_ids=out.token_ids, text=out.text,
                            finish_reason=_FINISH_REASONS.get(out.finish_reason,
                                                              pb.FINISH_REASON_UNSPECIFIED))
    if out.logprobs is not None:
        tops = out.top_logprobs or [[] for _ in out.logprobs]
        msg.logprobs.extend(
            pb.TokenLogprob(token_id=token, logprob=lp,
                            top_logprobs=[pb.Logprob(token_id=t, logprob=v) for t, v in top])
            for token, lp, top in zip(out.token_ids, out.logprobs, tops))
    # bool is an int too, but the engine never reports one; check str first to keep that obvious.
    if isinstance(out.stop_reason, str):
        msg.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        msg.stop_token_id = out.stop_reason
    return msg


def response_to_proto(out: RequestOutput) -> pb.GenerateResponse:
    usage = out.usage
    return pb.GenerateResponse(
        request_id=out.request_id, finished=out.finished,
        outputs=[_sequence_to_proto(o) for o in out.outputs],
        usage=pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       total_tokens=usage.total_tokens, cached_tokens=usage.cached_tokens))


def _merge_responses(parts: list[pb.GenerateResponse]) -> pb.GenerateResponse:
    """The whole completion from stream increments, as the unary call returns it."""
    merged: dict[int, pb.SequenceOutput] = {}
    texts: dict[int, list[str]] = {}
    for part in parts:
        for inc in part.outputs:
            # MergeFrom appends repeated fields and keeps a set finish/stop reason, but it would
            # replace the text, which is joined separately.
            merged.setdefault(inc.index, pb.SequenceOutput()).MergeFrom(inc)
            texts.setdefault(inc.index, []).append(inc.text)
    last = parts[-1]
    for index, seq in merged.items():
        seq.text = "".join(texts[index])
    return pb.GenerateResponse(request_id=last.request_id, finished=last.finished, usage=last.usage,
                               outputs=[merged[i] for i in sorted(merged)])


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, client: StreamingEngineClient, tokenizer: Tokenizer,
                 limits: RequestLimits | None = None, retry_after_s: float = 1.0):
        self._client = client
        self._tokenizer = tokenizer
        self._limits = limits if limits is not None else RequestLimits()
        self._retry_after_s = retry_after_s

    # --- admission: everything that can be checked before the engine sees the request ------------
    def _encode(self, text: str, add_bos: bool) -> list[int]:
        try:
            return self._tokenizer.encode(text, add_bos=add_bos)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            return self._encode(request.text, request.add_bos)
        if kind == "token_ids":
            if request.add_bos:
                raise ValueError("add_bos applies to a text prompt only; put the BOS id in token_ids")
            return list(request.token_ids.ids)
        raise ValueError("prompt: set either text or token_ids")

    def _admit(self, request: pb.GenerateRequest, context) -> tuple[list[int], SamplingParams]:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _Rejected(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before generation")
        msg = request.sampling_params
        # Counted before anything is decoded or tokenized: a message may hold 4 MB of stop strings.
        so = msg.structured_output if msg.HasField("structured_output") else None
        rejection = check_limits(self._limits, stop=msg.stop, n=msg.n if msg.HasField("n") else 1,
                                 logprobs=msg.logprobs if msg.HasField("logprobs") else None,
                                 logit_bias=len(msg.logit_bias),
                                 structured_output=None if so is None else ("structured_output", so.ByteSize()))
        if rejection is not None:
            raise RequestRejected(rejection)
        prompt_ids = self._prompt_ids(request)
        if msg.HasField("truncate_prompt_tokens"):  # vLLM's: before the context-length check
            rejection = check_truncation(msg.truncate_prompt_tokens, self._client.max_model_len)
            if rejection is not None:
                raise RequestRejected(rejection)
            prompt_ids = prompt_ids[-msg.truncate_prompt_tokens:]
        params = sampling_params_from_proto(msg)
        rejection = check_token_ids(list(msg.logit_bias), self._tokenizer.vocab_size, "logit_bias")
        if rejection is not None:  # gRPC has no separate field for the parameter: name it in the text
            raise RequestRejected(Rejection(f"logit_bias: {rejection.message}", rejection.param))
        # The engine admits it too, but a remote engine would only do so after queueing.
        rejection = admit(prompt_ids, params.max_tokens, vocab_size=self._tokenizer.vocab_size,
                          max_model_len=self._client.max_model_len)
        if rejection is not None:
            raise RequestRejected(rejection)
        return prompt_ids, params

    # --- generation ------------------------------------------------------------------------------
    async def _responses(self, request: pb.GenerateRequest, context,
                         request_id: str) -> AsyncIterator[pb.GenerateResponse]:
        prompt_ids, params = self._admit(request, context)
        stream = self._client.generate(prompt_ids, params, request_id)
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield response_to_proto(out)
        finally:
            if not finished:
                # Runs on cancellation and deadlines too: the engine must not keep decoding for
                # nobody. Shielded so a second cancellation cannot skip the abort.
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await asyncio.shield(close())
                await asyncio.shield(self._client.abort(request_id))

    async def GenerateStream(self, request, context):
        request_id = f"grpc-{uuid.uuid4().hex}"
        try:
            async for response in self._responses(request, context, request_id):
                yield response
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status code
            status = _status_of(exc, request_id, self._retry_after_s)
            await context.abort(status.code, status.message, status.trailers)

    async def Generate(self, request, context):
        request_id = f"grpc-{uuid.uuid4().hex}"
        try:
            parts = [response async for response in self._responses(request, context, request_id)]
            return _merge_responses(parts)
        except Exception as exc:  # noqa: BLE001
            status = _status_of(exc, request_id, self._retry_after_s)
            await context.abort(status.code, status.message, status.trailers)

    # --- tokenizer -------------------------------------------------------------------------------
    async def Tokenize(self, request, context):
        try:
            ids = self._encode(request.text, request.add_bos)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self._client.max_model_len)

    async def Detokenize(self, request, context):
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            text = self._tokenizer.decode(list(request.token_ids), skip_special=skip)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.DetokenizeResponse(text=text)


class EngineHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 that follows the engine: SERVING while `client.is_healthy`, else NOT_SERVING.

    The engine has no callback for dying, so the status is read on each Check and polled while a
    Watch is open.
    """

    def __init__(self, client: StreamingEngineClient, services: Seq[str], poll_s: float = 1.0):
        super().__init__()
        self._client = client
        self._services = ("", *services)  # "" is the server as a whole
        self._poll_s = poll_s

    async def refresh(self) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self._client.is_healthy
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in self._services:
            await self.set(service, status)

    async def Check(self, request, context):
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request, context):
        async def poll() -> None:
            while True:
                await self.refresh()
                await asyncio.sleep(self._poll_s)

        await self.refresh()  # the first reply must not race the poller
        poller = asyncio.ensure_future(poll())
        try:
            await super().Watch(request, context)
        finally:
            poller.cancel()


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` metadata on every method but health checks."""

    def __init__(self, api_keys: frozenset[str]):
        # Comparing digests keeps the comparison's time independent of the keys' lengths as well.
        self._digests = tuple(_digest(key) for key in api_keys)

    def authorized(self, metadata) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str):
            return False
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = _digest(token.strip())
        # Compare with every key, so the time does not reveal which one matched.
        return any([hmac.compare_digest(digest, key) for key in self._digests])  # noqa: C419

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or details.method.startswith(_OPEN_METHOD_PREFIX)
                or self.authorized(details.invocation_metadata)):
            return handler
        return _unauthenticated(handler)


_UNDECODABLE = object()  # what a request that is not the method's message decodes to


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Answers a Generation request whose bytes are not its message with INVALID_ARGUMENT rather than
    grpc's UNKNOWN (which names a Python exception). Installed inside the key check, so an
    unauthenticated caller learns nothing about what it sent."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{GENERATION_SERVICE}/"):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _checked_unary(handler.unary_unary), request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _checked_stream(handler.unary_stream), request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler


def _safe(deserialize):
    def decode(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and whatever a bad message raises
            return _UNDECODABLE
    return decode


async def _refuse_undecodable(context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        "the request message could not be decoded as this method's request type")


def _checked_unary(behaviour):
    async def call(request, context):
        if request is _UNDECODABLE:
            await _refuse_undecodable(context)
        return await behaviour(request, context)
    return call


def _checked_stream(behaviour):
    async def call(request, context):
        if request is _UNDECODABLE:
            await _refuse_undecodable(context)
        async for response in behaviour(request, context):
            yield response
    return call


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _unauthenticated(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid API key (metadata 'authorization: Bearer <key>')")

    kinds = ((handler.unary_unary, grpc.unary_unary_rpc_method_handler),
             (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
             (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
             (handler.stream_stream, grpc.stream_stream_rpc_method_handler))
    make = next(factory for behaviour, factory in kinds if behaviour is not None)
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def server_options(settings: GrpcConfig) -> list[tuple[str, int]]:
    """grpc core's channel arguments for `settings` (gateway/config.py explains them)."""
    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
               ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_s)),
               ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_s)),
               ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_ping_interval_s)),
               ("grpc.keepalive_permit_without_calls", 1)]
    if settings.max_connection_age_s is not None:
        options += [("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_s))]
    return options


def build_grpc_server(client: StreamingEngineClient, tokenizer: Tokenizer | None = None,
                      api_keys: frozenset[str] | None = None, host: str = "127.0.0.1",
                      port: int = 50051, *, limits: RequestLimits | None = None,
                      settings: GrpcConfig | None = None, retry_after_s: float = 1.0) -> grpc.aio.Server:
    """A grpc.aio server (not started) with Generation, grpc.health.v1 and server reflection.

    `tokenizer` defaults to the client's. `api_keys=None` turns authentication off; an empty set is
    refused rather than read as "nobody may call". Port 0 binds a free port (logged). Call
    `await server.start()` and, to stop, `await server.stop(grace)` in the event loop that serves the
    engine client.
    """
    if api_keys is not None and not api_keys:
        raise ValueError("api_keys must be None (no authentication) or a non-empty set of keys")
    tokenizer = tokenizer if tokenizer is not None else client.tokenizer
    # The key check runs first: an unauthenticated caller hears UNAUTHENTICATED whatever it sent.
    interceptors = [*([ApiKeyInterceptor(frozenset(api_keys))] if api_keys else []), DecodeGuardInterceptor()]
    # grpc enables SO_REUSEPORT by default, which would let a second server silently share the port.
    options = [("grpc.so_reuseport", 0), *server_options(settings if settings is not None else GrpcConfig())]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(client, tokenizer, limits, retry_after_s), server)
    health_pb2_grpc.add_HealthServicer_to_server(
        EngineHealthServicer(client, [GENERATION_SERVICE]), server)
    reflection.enable_server_reflection(
        (GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if port == 0:
        logger.info("gRPC server bound to port %d", bound)
    return server
