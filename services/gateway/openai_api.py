"""The OpenAI-compatible HTTP API (FastAPI), over any `EngineClient`.

`create_app(context)` builds the app; the Ray Serve gateway builds one per replica with a client over
a `DeploymentHandle`, tests build one over an in-process `AsyncEngine` (`LocalEngineClient`).

A request is authenticated and size-checked by middleware, validated (pydantic types, then
`SamplingParams` ranges), rendered through the chat template, tokenized and checked against the
context length here, before anything reaches the engine. Each prompt becomes one engine request whose
first output is awaited before the HTTP answer starts, so a full queue (429), a dead engine (503) or an
engine-side rejection (400) still gets its own status even for `stream: true`. A client that goes away
cancels the engine call; the engine then aborts the request and frees its blocks.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from services.engine.async_engine import EngineDeadError
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams
from services.gateway import protocol as p
from services.gateway.auth import ApiKeyMiddleware, ApiKeys, BodyLimitMiddleware
from services.gateway.config import AppConfig
from services.gateway.engine_client import EngineClient, ModelInfo
from services.gateway.errors import (
    ApiError,
    BadRequestError,
    NotFoundError,
    QueueFullError,
    bad_request,
    engine_unavailable,
    install_error_handlers,
    queue_full,
)
from services.gateway.metrics import GatewayMetrics, HttpMetricsMiddleware
from services.gateway.protocol import Choice, chat_logprobs, completion_logprobs
from services.model.chat_template import ChatTemplate
from services.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_DONE = "data: [DONE]\n\n"
_CHAT_RENAME = {"logprobs": "top_logprobs"}


@dataclass(frozen=True)
class GenerationJob:
    """One prompt of an API request = one engine request (with params.n sequences)."""

    first_index: int  # the API choice index of its sequence 0
    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    engine_id: str


@dataclass(frozen=True)
class GatewayContext:
    """Everything the routes use; one per app."""

    config: AppConfig
    model: ModelInfo
    tokenizer: Tokenizer
    template: ChatTemplate
    keys: ApiKeys
    engine: EngineClient
    metrics: GatewayMetrics

    @property
    def model_name(self) -> str:
        return self.config.model_name


def build_context(config: AppConfig, engine: EngineClient, keys: ApiKeys | None = None) -> GatewayContext:
    template = (ChatTemplate.from_file(config.chat_template, stop=config.chat_template_stop)
                if config.chat_template else ChatTemplate.default())
    return GatewayContext(config, engine.model_info, engine.tokenizer, template,
                          keys if keys is not None else ApiKeys.from_config(config.auth), engine,
                          GatewayMetrics(config.model_name))


class RequestIdMiddleware:
    """Takes X-Request-Id from the client (when it is a sane token) or makes one, and returns it.

    Behind Ray Serve's proxy the header always arrives (the proxy forwards the client's or makes its
    own) and the proxy returns it itself: then `echo=False`, or the answer would carry it twice."""

    def __init__(self, app, echo: bool = True):
        self.app = app
        self.echo = echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"x-request-id"),
                     "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def with_header(message):
            if message["type"] == "http.response.start" and self.echo:
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, receive, with_header)


# --- engine calls ----------------------------------------------------------------------------------

def _as_api_error(exc: BaseException, ctx: GatewayContext, rename: dict[str, str] | None = None) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return queue_full(exc, ctx.config.retry_after_s)
    if isinstance(exc, EngineDeadError):
        return engine_unavailable(exc, ctx.config.retry_after_s)
    if isinstance(exc, ValueError):
        return bad_request(exc, rename)
    logger.error("engine call failed", exc_info=exc)
    error = ApiError("internal error while generating", code="internal_error")
    error.status, error.type = 500, "server_error"
    return error


async def _close(stream: AsyncIterator) -> None:
    try:
        await stream.aclose()  # type: ignore[attr-defined]
    except Exception:
        logger.debug("closing an engine stream failed", exc_info=True)


Started = list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]


async def _start(ctx: GatewayContext, jobs: list[GenerationJob], rename: dict[str, str] | None) -> Started:
    """Submit every job and wait for each one's first output: rejections surface here, before any
    byte of the answer is sent."""
    async def open_one(job: GenerationJob):
        stream = ctx.engine.generate(job.prompt_ids, job.params, job.engine_id)
        try:
            return await stream.__anext__(), stream
        except BaseException:
            await _close(stream)
            raise

    results = await asyncio.gather(*(open_one(job) for job in jobs), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for r in results:
            if not isinstance(r, BaseException):
                await _close(r[1])
        if any(isinstance(r, asyncio.CancelledError) for r in failed):
            raise asyncio.CancelledError()
        raise _as_api_error(failed[0], ctx, rename)
    return results  # type: ignore[return-value]


async def _outputs(started: Started) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(job index, output) from all jobs as they come; closing this closes every engine stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            queue.put_nowait((index, first, None))
            if not first.finished:
                async for out in stream:
                    queue.put_nowait((index, out, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, exc))
        finally:
            await _close(stream)
            queue.put_nowait((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, first, stream)) for i, (first, stream) in enumerate(started)]
    try:
        remaining = len(tasks)
        while remaining:
            index, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
            else:
                yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(request: Request, work: Awaitable, ctx: GatewayContext,
                            rename: dict[str, str] | None):
    """Run `work` unless the client goes away first; then cancel it (which aborts the engine calls)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            ctx.metrics.disconnect()
        watch.cancel()
    if task.cancelled():
        return Response(status_code=499)
    try:
        return task.result()
    except Exception as exc:
        raise _as_api_error(exc, ctx, rename) from exc


def _sse(chunk: p.BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _sse_stream(ctx: GatewayContext, events: AsyncIterator[str], rename: dict[str, str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        complete = False
        try:
            async for event in events:
                yield event
            complete = True
        except Exception as exc:  # noqa: BLE001 - the status is sent: report in-band, as OpenAI does
            complete = True
            yield f"data: {p.ErrorResponse.model_validate(_as_api_error(exc, ctx, rename).body()).model_dump_json()}\n\n"
        finally:
            if not complete:
                ctx.metrics.disconnect()
        yield _DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- admission -------------------------------------------------------------------------------------

def _check_model(ctx: GatewayContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise NotFoundError(f"the model {model!r} does not exist; this server serves {ctx.model_name!r}",
                            param="model", code="model_not_found")


def _check_prompt(ctx: GatewayContext, ids: list[int], max_tokens: int | None, param: str) -> int:
    """Validate a prompt's ids and return the max_tokens to use (None: the rest of the context)."""
    limit = ctx.model.max_model_len
    if not ids:
        raise BadRequestError("the prompt is empty", param=param)
    vocab = ctx.model.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise BadRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param=param)
    wanted = max_tokens if max_tokens is not None else max(1, limit - len(ids))
    if len(ids) + wanted > limit:
        raise BadRequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} for the completion). Please "
            f"reduce the length of the prompt or max_tokens.",
            param=param if len(ids) >= limit else "max_tokens", code="context_length_exceeded")
    return wanted


def _reject_unsupported(req: p.SamplingFields) -> None:
    if req.logit_bias:
        raise BadRequestError("logit_bias is not supported", param="logit_bias")


def _render_chat(ctx: GatewayContext, messages: list[p.ChatMessage], add_generation_prompt: bool) -> str:
    try:
        return ctx.template.render([m.for_template() for m in messages], add_generation_prompt)
    except ValueError as exc:
        raise BadRequestError(str(exc), param="messages") from None


def _encode(ctx: GatewayContext, text: str, param: str) -> list[int]:
    try:
        return ctx.tokenizer.encode(text)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(str(exc), param=param) from None


def _usage(outputs: list[RequestOutput]) -> p.UsageInfo:
    prompt = sum(o.usage.prompt_tokens for o in outputs)
    completion = sum(o.usage.completion_tokens for o in outputs)
    return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=p.PromptTokensDetails(
                           cached_tokens=sum(o.usage.cached_tokens for o in outputs)))


def _engine_id(request_id: str, index: int) -> str:
    # Unique even when a client reuses its X-Request-Id while the first request still runs.
    return f"{request_id}-{index}-{uuid.uuid4().hex[:8]}"


# --- routes ----------------------------------------------------------------------------------------

def create_app(ctx: GatewayContext, echo_request_id: bool = True) -> FastAPI:
    """`echo_request_id=False` behind a proxy that returns X-Request-Id itself (Ray Serve's)."""
    app = FastAPI(title="grok-serve", version=_version(), strict_content_type=False,
                  responses={400: {"model": p.ErrorResponse}})
    install_error_handlers(app)
    tok = ctx.tokenizer

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        _check_model(ctx, body.model)
        _reject_unsupported(body)
        if body.tools:
            raise BadRequestError("tools are not supported", param="tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        ids = _encode(ctx, _render_chat(ctx, body.messages, body.add_generation_prompt), "messages")
        max_tokens = _check_prompt(ctx, ids, max_tokens, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        rename = dict(_CHAT_RENAME, max_tokens="max_completion_tokens" if body.max_completion_tokens
                      is not None else "max_tokens")
        try:
            params = body.sampling_params(max_tokens, logprobs, ctx.template.stop)
        except ValueError as exc:
            raise bad_request(exc, rename) from None
        rid = request.state.request_id
        jobs = [GenerationJob(0, ids, None, params, _engine_id(rid, 0))]
        created = int(time.time())
        if body.stream:
            started = await _start(ctx, jobs, rename)
            return _sse_stream(ctx, _chat_events(ctx, body, started, f"chatcmpl-{rid}", created), rename)
        return await _until_disconnect(request, _chat_response(ctx, body, jobs, rename, f"chatcmpl-{rid}",
                                                               created), ctx, rename)

    @app.post("/v1/completions", response_model=p.CompletionResponse)
    async def completions(body: p.CompletionRequest, request: Request):
        _check_model(ctx, body.model)
        _reject_unsupported(body)
        if body.suffix:
            raise BadRequestError("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise BadRequestError("best_of other than n is not supported", param="best_of")
        if body.echo and body.logprobs is not None:
            raise BadRequestError("echo with logprobs is not supported (prompt logprobs are not computed)",
                                  param="echo")
        prompts = _completion_prompts(ctx, body.prompt)
        try:
            jobs = []
            for i, (ids, text) in enumerate(prompts):
                max_tokens = _check_prompt(ctx, ids, body.max_tokens, "prompt")
                params = body.sampling_params(max_tokens, body.logprobs)
                jobs.append(GenerationJob(i * body.n, ids, text, params,
                                          _engine_id(request.state.request_id, i)))
        except ValueError as exc:
            raise bad_request(exc) from None
        rid, created = f"cmpl-{request.state.request_id}", int(time.time())
        if body.stream:
            started = await _start(ctx, jobs, None)
            return _sse_stream(ctx, _completion_events(ctx, body, jobs, started, rid, created), {})
        return await _until_disconnect(request, _completion_response(ctx, body, jobs, rid, created), ctx, None)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models():
        card = p.ModelCard(id=ctx.model_name, created=ctx.model.created, root=ctx.model.source,
                           max_model_len=ctx.model.max_model_len)
        return p.ModelList(data=[card])

    @app.get("/health", response_model=p.HealthResponse, responses={503: {"model": p.ErrorResponse}})
    async def health():
        try:
            await asyncio.wait_for(ctx.engine.check_health(), ctx.config.engine_call_timeout_s)
        except (asyncio.TimeoutError, EngineDeadError) as exc:
            raise engine_unavailable(exc if str(exc) else TimeoutError("no answer in time"),
                                     ctx.config.retry_after_s) from None
        return p.HealthResponse()

    @app.get("/metrics")
    async def metrics():
        try:
            snapshot = await asyncio.wait_for(ctx.engine.metrics_snapshot(), ctx.config.engine_call_timeout_s)
            ctx.metrics.fold(snapshot)
        except Exception:
            logger.warning("engine metrics unavailable", exc_info=True)
            ctx.metrics.scrape_error()
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", response_model=p.TokenizeResponse)
    async def tokenize(body: p.TokenizeRequest):
        _check_model(ctx, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequestError("give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = _encode(ctx, _render_chat(ctx, body.messages, body.add_generation_prompt), "messages")
        else:
            ids = _encode(ctx, body.prompt, "prompt")
        if body.add_bos:
            ids = [tok.bos_id, *ids]
        return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.model.max_model_len)

    @app.post("/detokenize", response_model=p.DetokenizeResponse)
    async def detokenize(body: p.DetokenizeRequest):
        _check_model(ctx, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < ctx.model.vocab_size), None)
        if bad is not None:
            raise BadRequestError(f"token id {bad} is outside the vocabulary [0, {ctx.model.vocab_size})",
                                  param="tokens")
        return p.DetokenizeResponse(prompt=tok.decode(body.tokens))

    @app.get("/version", response_model=p.VersionResponse)
    async def version():
        return p.VersionResponse(version=_version())

    routes = frozenset(r.path for r in app.routes)
    # Outermost first: count every answer, tag it with its id, then authenticate, then limit the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=ctx.config.max_body_bytes)
    open_paths = frozenset(path for path, is_open in (("/health", ctx.config.auth.open_health),
                                                       ("/metrics", ctx.config.auth.open_metrics)) if is_open)
    app.add_middleware(ApiKeyMiddleware, keys=ctx.keys, open_paths=open_paths)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)
    app.add_middleware(HttpMetricsMiddleware, metrics=ctx.metrics, routes=routes)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("grok-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _completion_prompts(ctx: GatewayContext, prompt) -> list[tuple[list[int], str | None]]:
    """(ids, text) per prompt: text, list of texts, token ids, or list of token-id lists."""
    if isinstance(prompt, str):
        return [(_encode(ctx, prompt, "prompt"), prompt)]
    if not prompt:
        raise BadRequestError("prompt must not be empty", param="prompt")
    if all(isinstance(x, str) for x in prompt):
        return [(_encode(ctx, text, "prompt"), text) for text in prompt]
    if all(isinstance(x, int) for x in prompt):
        return [(list(prompt), None)]
    return [(list(ids), None) for ids in prompt]


# --- chat ------------------------------------------------------------------------------------------

async def _chat_response(ctx: GatewayContext, body: p.ChatCompletionRequest, jobs: list[GenerationJob],
                         rename: dict[str, str], rid: str, created: int) -> Response:
    started = await _start(ctx, jobs, rename)
    choices = {i: Choice() for i in range(body.n)}
    finals = []
    async for _, out in _outputs(started):
        for o in out.outputs:
            choices[o.index].add(o)
        if out.finished:
            finals.append(out)
    result = p.ChatCompletionResponse(
        id=rid, created=created, model=ctx.model_name, usage=_usage(finals),
        choices=[p.ChatChoice(
            index=i, message=p.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
            stop_reason=c.stop_reason, token_ids=c.token_ids if body.return_token_ids else None,
            logprobs=p.ChatLogprobs(content=chat_logprobs(ctx.tokenizer, c.token_ids, c.logprobs,
                                                          c.top_logprobs)) if body.logprobs else None)
            for i, c in sorted(choices.items())])
    return Response(result.model_dump_json(), media_type="application/json")


async def _chat_events(ctx: GatewayContext, body: p.ChatCompletionRequest, started: Started, rid: str,
                       created: int) -> AsyncIterator[str]:
    def chunk(choices: list[p.ChatStreamChoice], usage: p.UsageInfo | None = None) -> str:
        return _sse(p.ChatCompletionChunk(id=rid, created=created, model=ctx.model_name, choices=choices,
                                          usage=usage))

    for i in range(body.n):
        yield chunk([p.ChatStreamChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))])
    finals = []
    async for _, out in _outputs(started):
        for o in out.outputs:
            logprobs = p.ChatLogprobs(content=chat_logprobs(ctx.tokenizer, o.token_ids, o.logprobs or [],
                                                            o.top_logprobs)) if body.logprobs else None
            if (o.text or o.finish_reason or (logprobs is not None and logprobs.content)
                    or (body.return_token_ids and o.token_ids)):
                yield chunk([p.ChatStreamChoice(
                    index=o.index, delta=p.DeltaMessage(content=o.text or None), logprobs=logprobs,
                    finish_reason=o.finish_reason,
                    token_ids=o.token_ids if body.return_token_ids else None)])
        if out.finished:
            finals.append(out)
    if body.include_usage:
        yield chunk([], _usage(finals))


# --- completions -----------------------------------------------------------------------------------

async def _completion_response(ctx: GatewayContext, body: p.CompletionRequest, jobs: list[GenerationJob],
                               rid: str, created: int) -> Response:
    started = await _start(ctx, jobs, None)
    choices = {job.first_index + i: Choice() for job in jobs for i in range(body.n)}
    finals = []
    async for j, out in _outputs(started):
        for o in out.outputs:
            choices[jobs[j].first_index + o.index].add(o)
        if out.finished:
            finals.append(out)
    owner = {job.first_index + i: job for job in jobs for i in range(body.n)}
    result_choices = []
    for index, c in sorted(choices.items()):
        job = owner[index]
        prefix = _prompt_text(ctx, job) if body.echo else ""
        result_choices.append(p.CompletionChoice(
            index=index, text=prefix + c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            token_ids=c.token_ids if body.return_token_ids else None,
            prompt_token_ids=job.prompt_ids if body.return_token_ids else None,
            logprobs=completion_logprobs(ctx.tokenizer, c.token_ids, c.logprobs, c.top_logprobs, len(prefix))
            if body.logprobs is not None else None))
    result = p.CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=result_choices,
                                  usage=_usage(finals))
    return Response(result.model_dump_json(), media_type="application/json")


def _prompt_text(ctx: GatewayContext, job: GenerationJob) -> str:
    return job.prompt_text if job.prompt_text is not None else ctx.tokenizer.decode(job.prompt_ids)


async def _completion_events(ctx: GatewayContext, body: p.CompletionRequest, jobs: list[GenerationJob],
                             started: Started, rid: str, created: int) -> AsyncIterator[str]:
    def chunk(choices: list[p.CompletionChoice], usage: p.UsageInfo | None = None) -> str:
        return _sse(p.CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=choices,
                                         usage=usage))

    offsets = {}
    for job in jobs:
        for i in range(body.n):
            text = _prompt_text(ctx, job) if body.echo else ""
            offsets[job.first_index + i] = len(text)
            if body.echo:
                yield chunk([p.CompletionChoice(index=job.first_index + i, text=text)])
    finals = []
    async for j, out in _outputs(started):
        for o in out.outputs:
            index = jobs[j].first_index + o.index
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(ctx.tokenizer, o.token_ids, o.logprobs or [], o.top_logprobs,
                                               offsets[index])
                offsets[index] += sum(len(t) for t in logprobs.tokens)
            yield chunk([p.CompletionChoice(index=index, text=o.text, logprobs=logprobs,
                                            finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                                            token_ids=o.token_ids if body.return_token_ids else None)])
        if out.finished:
            finals.append(out)
    if body.include_usage:
        yield chunk([], _usage(finals))
