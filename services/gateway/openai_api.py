"""The OpenAI-compatible HTTP API (FastAPI), over any `EngineClient` (services/engine/api.py).

The routes are module-level (`router`) and find their `GatewayContext` (context.py) on the app;
`create_app(context)` builds an app around one. The Ray Serve gateway builds one per replica with a
client over a `DeploymentHandle`, tests build one over an in-process `AsyncEngine` (`LocalEngineClient`).

A request is authenticated and size-checked by middleware, validated (pydantic types, then
`SamplingParams` ranges), rendered through the chat template, tokenized and admitted
(services.engine.api.admit) here, before anything reaches the engine. Each prompt becomes one engine
request (generation.py streams or collects their outputs). A client that goes away cancels the engine
call; the engine then aborts the request and frees its blocks.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from services.engine.api import (
    EngineDeadError,
    EngineUnavailableError,
    Rejection,
    RequestRejected,
    admit,
    check_limits,
    check_token_ids,
    check_truncation,
    completion_budget,
)
from services.engine.sampling_params import SamplingParams
from services.engine.structured_output import StructuredOutput
from services.gateway import protocol as p
from services.gateway.auth import ApiKeyMiddleware, BodyLimitMiddleware
from services.gateway.context import GatewayContext, GenerationJob, build_context
from services.gateway.errors import BadRequestError, NotFoundError, install_error_handlers
from services.gateway.generation import (
    chat_events,
    chat_response,
    completion_events,
    completion_response,
    gateway_error,
    sse_stream,
    start_jobs,
    until_disconnect,
)
from services.gateway.metrics import HttpMetricsMiddleware
from services.gateway.proxy import sanitized_request_id
from services.gateway.structured_outputs import request_constraint
from services.gateway.tool_calls import CLOSE, tool_use

__all__ = ["GatewayContext", "build_context", "create_app", "router"]

logger = logging.getLogger(__name__)



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
        given = next((v for k, v in scope.get("headers", ()) if k.lower() == b"x-request-id"), None)
        request_id = sanitized_request_id(given)
        scope.setdefault("state", {})["request_id"] = request_id

        async def with_header(message):
            if message["type"] == "http.response.start" and self.echo:
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, receive, with_header)



# --- admission -------------------------------------------------------------------------------------

def _check_model(ctx: GatewayContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise NotFoundError(f"the model {model!r} does not exist; this server serves {ctx.model_name!r}",
                            param="model", code="model_not_found")



def _admit(ctx: GatewayContext, ids: list[int], max_tokens: int | None, param: str) -> int:
    """The max_tokens to ask the engine for (None: the rest of the context); raises RequestRejected."""
    limit = ctx.model.max_model_len
    rejection = admit(ids, max_tokens, vocab_size=ctx.model.vocab_size, max_model_len=limit, param=param)
    if rejection is not None:
        raise RequestRejected(rejection)
    return completion_budget(len(ids), max_tokens, limit)



def _check_limits(ctx: GatewayContext, body: p.SamplingFields, *, num_prompts: int = 1,
                  logprobs: int | None = None, messages: int = 0,
                  names: Mapping[str, str] | None = None,
                  constraint: StructuredOutput | None = None) -> None:
    """The per-request caps (services.engine.api.RequestLimits), before any prompt is tokenized."""
    stop = body.stop if body.stop is not None else ()
    rejection = check_limits(ctx.config.limits, stop=(stop,) if isinstance(stop, str) else stop,
                             num_prompts=num_prompts, n=body.n, logprobs=logprobs,
                             logit_bias=len(body.logit_bias or {}), messages=messages,
                             structured_output=None if constraint is None else (constraint.param, constraint.size),
                             names=dict(names or {}))
    if rejection is not None:
        raise RequestRejected(rejection)



def _num_prompts(prompt) -> int:
    if isinstance(prompt, str) or not prompt or all(isinstance(x, int) for x in prompt):
        return 1
    return len(prompt)



def _check_logit_bias(ctx: GatewayContext, params: SamplingParams) -> None:
    rejection = check_token_ids([token for token, _ in params.logit_bias], ctx.model.vocab_size, "logit_bias")
    if rejection is not None:
        raise RequestRejected(rejection)



def _render_chat(ctx: GatewayContext, messages: list[p.ChatMessage], add_generation_prompt: bool,
                 tools: list[dict] | None = None) -> str:
    try:
        return ctx.template.render([m.for_template() for m in messages], add_generation_prompt, tools)
    except ValueError as exc:
        raise BadRequestError(str(exc), param="messages") from None



def _encode(ctx: GatewayContext, text: str, param: str) -> list[int]:
    try:
        return ctx.tokenizer.encode(text)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(str(exc), param=param) from None



def _truncate(ctx: GatewayContext, ids: list[int], keep: int | None) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last `keep` tokens, before the context-length check."""
    rejection = check_truncation(keep, ctx.model.max_model_len)
    if rejection is not None:
        raise BadRequestError(rejection.message, param=rejection.param)
    return ids if keep is None else ids[-keep:]



def _engine_id(request_id: str, index: int) -> str:
    # Unique even when a client reuses its X-Request-Id while the first request still runs.
    return f"{request_id}-{index}-{uuid.uuid4().hex[:8]}"



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



def _chat_job(ctx: GatewayContext, body: p.ChatCompletionRequest,
              request_id: str) -> tuple[GenerationJob, Mapping[str, str]]:
    """The chat request as one engine request, and the engine's parameter names as this request
    spells them."""
    try:
        constraint = request_constraint(body)
        tools = tool_use(body)
        if tools is not None and tools.constraint is not None:
            if constraint is not None:
                raise RequestRejected(Rejection(f"tool_choice {tools.mode!r} constrains the output, so it "
                                                f"cannot be combined with {constraint.param}", "tool_choice"))
            constraint = tools.constraint
        _check_limits(ctx, body, logprobs=body.top_logprobs, messages=len(body.messages),
                      names={"logprobs": "top_logprobs"}, constraint=constraint)
    except ValueError as exc:
        raise gateway_error(ctx, exc) from None
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    completion_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    rename = {"logprobs": "top_logprobs", "max_tokens": completion_field}
    prompt = _render_chat(ctx, body.messages, body.add_generation_prompt,
                          None if tools is None else tools.template_tools())
    ids = _encode(ctx, prompt, "messages")
    ids = _truncate(ctx, ids, body.truncate_prompt_tokens)
    # An unconstrained call ends the answer: what follows it would be the model inventing the result.
    extra_stop = (*ctx.template.stop, *((CLOSE,) if tools is not None and tools.mode == "auto" else ()))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:
        max_tokens = _admit(ctx, ids, getattr(body, completion_field), "messages")
        params = body.sampling_params(max_tokens, logprobs, extra_stop, structured_output=constraint)
        _check_logit_bias(ctx, params)
    except ValueError as exc:
        raise gateway_error(ctx, exc, rename) from None
    return GenerationJob(0, ids, None, params, _engine_id(request_id, 0)), rename



def _completion_jobs(ctx: GatewayContext, body: p.CompletionRequest, request_id: str) -> list[GenerationJob]:
    """One engine request per prompt."""
    try:
        constraint = request_constraint(body)
        _check_limits(ctx, body, num_prompts=_num_prompts(body.prompt), logprobs=body.logprobs,
                      constraint=constraint)
    except ValueError as exc:
        raise gateway_error(ctx, exc) from None
    if body.suffix:
        raise BadRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise BadRequestError("best_of other than n is not supported", param="best_of")
    # echo + logprobs returns the prompt's logprobs too, so the engine computes them (as vLLM does).
    wanted = [n for n in (body.prompt_logprobs, body.logprobs if body.echo else None) if n is not None]
    prompt_logprobs = max(wanted) if wanted else None
    jobs = []
    try:
        for i, (whole, text) in enumerate(_completion_prompts(ctx, body.prompt)):
            ids = _truncate(ctx, whole, body.truncate_prompt_tokens)
            text = text if len(ids) == len(whole) else None  # echo shows what the model saw
            params = body.sampling_params(_admit(ctx, ids, body.max_tokens, "prompt"), body.logprobs,
                                          prompt_logprobs=prompt_logprobs, structured_output=constraint)
            _check_logit_bias(ctx, params)
            jobs.append(GenerationJob(i * body.n, ids, text, params, _engine_id(request_id, i)))
    except ValueError as exc:
        raise gateway_error(ctx, exc) from None
    return jobs



# --- routes ----------------------------------------------------------------------------------------

def _context(request: Request) -> GatewayContext:
    return request.app.state.gateway



Context = Annotated[GatewayContext, Depends(_context)]

router = APIRouter()



@router.post("/v1/chat/completions", response_model=p.ChatCompletionResponse)
async def chat_completions(body: p.ChatCompletionRequest, request: Request, ctx: Context):
    _check_model(ctx, body.model)
    job, rename = _chat_job(ctx, body, request.state.request_id)
    rid, created = f"chatcmpl-{request.state.request_id}", int(time.time())
    if body.stream:
        started = await start_jobs(ctx, [job], rename)
        return sse_stream(ctx, chat_events(ctx, body, started, rid, created), rename)
    return await until_disconnect(request, chat_response(ctx, body, [job], rename, rid, created), ctx, rename)



@router.post("/v1/completions", response_model=p.CompletionResponse)
async def completions(body: p.CompletionRequest, request: Request, ctx: Context):
    _check_model(ctx, body.model)
    jobs = _completion_jobs(ctx, body, request.state.request_id)
    rid, created = f"cmpl-{request.state.request_id}", int(time.time())
    if body.stream:
        started = await start_jobs(ctx, jobs, None)
        return sse_stream(ctx, completion_events(ctx, body, jobs, started, rid, created), None)
    return await until_disconnect(request, completion_response(ctx, body, jobs, rid, created), ctx, None)



def _model_card(ctx: GatewayContext) -> p.ModelCard:
    return p.ModelCard(id=ctx.model_name, created=ctx.model.created, root=ctx.model.source,
                       max_model_len=ctx.model.max_model_len)



@router.get("/v1/models", response_model=p.ModelList)
async def models(ctx: Context):
    return p.ModelList(data=[_model_card(ctx)])



# `path`: a served model name may contain slashes (a checkpoint directory, `org/name`).
@router.get("/v1/models/{model_id:path}", response_model=p.ModelCard,
            responses={404: {"model": p.ErrorResponse}})
async def model(model_id: str, ctx: Context):
    _check_model(ctx, model_id)
    return _model_card(ctx)



# HEAD as well: load balancers often probe with it.
@router.api_route("/health", methods=["GET", "HEAD"], response_model=p.HealthResponse,
                  responses={503: {"model": p.ErrorResponse}})
async def health(ctx: Context):
    try:
        await asyncio.wait_for(ctx.engine.check_health(), ctx.config.engine_call_timeout_s)
    except asyncio.TimeoutError:
        raise gateway_error(ctx, EngineUnavailableError("no answer in time")) from None
    except EngineDeadError as exc:
        raise gateway_error(ctx, exc) from None
    return p.HealthResponse()



@router.get("/metrics")
async def metrics(ctx: Context):
    try:
        snapshot = await asyncio.wait_for(ctx.engine.metrics_snapshot(), ctx.config.engine_call_timeout_s)
        ctx.metrics.fold(snapshot)
    except Exception:
        logger.warning("engine metrics unavailable", exc_info=True)
        ctx.metrics.scrape_error()
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)



@router.post("/tokenize", response_model=p.TokenizeResponse)
async def tokenize(body: p.TokenizeRequest, ctx: Context):
    _check_model(ctx, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise BadRequestError("give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        ids = _encode(ctx, _render_chat(ctx, body.messages, body.add_generation_prompt), "messages")
    else:
        ids = _encode(ctx, body.prompt, "prompt")
    if body.add_bos or body.add_special_tokens:
        ids = [ctx.tokenizer.bos_id, *ids]
    return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.model.max_model_len)



@router.post("/detokenize", response_model=p.DetokenizeResponse)
async def detokenize(body: p.DetokenizeRequest, ctx: Context):
    _check_model(ctx, body.model)
    rejection = check_token_ids(body.tokens, ctx.model.vocab_size, "tokens")
    if rejection is not None:
        raise gateway_error(ctx, RequestRejected(rejection))
    return p.DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))



@router.get("/tokenizer_info", response_model=p.TokenizerInfoResponse)
async def tokenizer_info(ctx: Context):
    tok = ctx.tokenizer
    # Special tokens by their piece where the tokenizer has pieces (SentencePiece); the byte tokenizer
    # has no text for them.
    text = getattr(tok, "piece", lambda _: None)
    return p.TokenizerInfoResponse(
        tokenizer_class=type(tok).__name__, vocab_size=tok.vocab_size, model_max_length=ctx.model.max_model_len,
        bos_token=text(tok.bos_id), eos_token=text(tok.eos_id), pad_token=text(tok.pad_id),
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        chat_template=ctx.template.source)


@router.get("/version", response_model=p.VersionResponse)
async def version():
    return p.VersionResponse(version=_version())



def create_app(ctx: GatewayContext, echo_request_id: bool = True) -> FastAPI:
    """`echo_request_id=False` behind a proxy that returns X-Request-Id itself (Ray Serve's)."""
    app = FastAPI(title="grok-serve", version=_version(), strict_content_type=False,
                  responses={400: {"model": p.ErrorResponse}})
    app.state.gateway = ctx
    install_error_handlers(app)
    app.include_router(router)
    # FastAPI lists an included router as one entry of app.routes, without a path.
    routes = frozenset(path for r in (*app.routes, *router.routes) if (path := getattr(r, "path", None)))
    # Outermost first: count every answer, answer CORS, tag it with its id, then authenticate, then
    # limit the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=ctx.config.max_body_bytes,
                       read_timeout_s=ctx.config.body_read_timeout_s)
    open_paths = frozenset(path for path, is_open in (("/health", ctx.config.auth.open_health),
                                                       ("/metrics", ctx.config.auth.open_metrics)) if is_open)
    app.add_middleware(ApiKeyMiddleware, keys=ctx.keys, open_paths=open_paths)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)
    cors = ctx.config.cors
    if cors.enabled:
        # Outside authentication: a browser's preflight carries no API key, and a 401 or 413 must
        # still reach the page with the headers that let it read the error.
        app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_methods=cors.allowed_methods,
                           allow_headers=cors.allowed_headers, allow_credentials=cors.allow_credentials,
                           expose_headers=("X-Request-Id", "Retry-After"), max_age=cors.max_age_s)
    app.add_middleware(HttpMetricsMiddleware, metrics=ctx.metrics, routes=routes)
    return app



def _version() -> str:
    try:
        return importlib.metadata.version("grok-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"

