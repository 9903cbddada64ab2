"""From engine requests to OpenAI answers: submitting a request's jobs, streaming their outputs as
server-sent events or collecting them into one response, and cancelling them when the client leaves.

Each job's first output is awaited before the answer starts (`start_jobs`), so a full queue (429), a
dead engine (503) or an engine-side rejection (400) still gets its own status even for `stream: true`.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from services.engine.outputs import RequestOutput
from services.gateway import protocol as p
from services.gateway.context import GatewayContext, GenerationJob
from services.gateway.errors import ApiError, api_error
from services.gateway.protocol import (
    Choice,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    prompt_logprobs,
)
from services.gateway.tool_calls import ToolCallStream, ToolUse, parse_call, tool_use

logger = logging.getLogger(__name__)

_DONE = "data: [DONE]\n\n"


def gateway_error(ctx: GatewayContext, exc: BaseException, rename: Mapping[str, str] | None = None) -> ApiError:
    return api_error(exc, ctx.config.retry_after_s, rename)


async def _close(stream: AsyncIterator) -> None:
    try:
        await stream.aclose()  # type: ignore[attr-defined]
    except Exception:
        logger.debug("closing an engine stream failed", exc_info=True)


Started = list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]


async def start_jobs(ctx: GatewayContext, jobs: list[GenerationJob], rename: Mapping[str, str] | None) -> Started:
    """Submit every job and wait for each one's first output: rejections surface here, before any
    byte of the answer is sent. All or nothing: the first job refused (a full queue, say) cancels the
    others at once, rather than after they have run, and the client hears of it at once."""
    async def open_one(job: GenerationJob):
        stream = ctx.engine.generate(job.prompt_ids, job.params, job.engine_id)
        try:
            return await stream.__anext__(), stream
        except BaseException:
            await _close(stream)
            raise

    tasks = [asyncio.ensure_future(open_one(job)) for job in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        await _abandon(tasks)
        raise
    failed = [t for t in tasks if t.done() and (t.cancelled() or t.exception() is not None)]
    if failed:
        await _abandon(tasks)
        first = next((t.exception() for t in failed if not t.cancelled()
                      and not isinstance(t.exception(), asyncio.CancelledError)), None)
        if first is None:
            raise asyncio.CancelledError()
        raise gateway_error(ctx, first, rename)
    return [task.result() for task in tasks]


async def _abandon(tasks: list[asyncio.Future]) -> None:
    """Cancel the jobs still starting and close those that started."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is None:
            await _close(task.result()[1])


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


async def until_disconnect(request: Request, work: Awaitable, ctx: GatewayContext,
                            rename: Mapping[str, str] | None):
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
        raise gateway_error(ctx, exc, rename) from exc


def _sse(chunk: p.BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def sse_stream(ctx: GatewayContext, events: AsyncIterator[str],
                rename: Mapping[str, str] | None) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        complete = False
        try:
            async for event in events:
                yield event
            complete = True
        except Exception as exc:  # noqa: BLE001 - the status is sent: report in-band, as OpenAI does
            complete = True
            yield f"data: {p.ErrorResponse.model_validate(gateway_error(ctx, exc, rename).body()).model_dump_json()}\n\n"
        finally:
            if not complete:
                ctx.metrics.disconnect()
        yield _DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(outputs: list[RequestOutput]) -> p.UsageInfo:
    prompt = sum(o.usage.prompt_tokens for o in outputs)
    completion = sum(o.usage.completion_tokens for o in outputs)
    return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=p.PromptTokensDetails(
                           cached_tokens=sum(o.usage.cached_tokens for o in outputs)))



# --- chat ------------------------------------------------------------------------------------------

async def chat_response(ctx: GatewayContext, body: p.ChatCompletionRequest, jobs: list[GenerationJob],
                         rename: Mapping[str, str], rid: str, created: int) -> Response:
    started = await start_jobs(ctx, jobs, rename)
    choices = {i: Choice() for i in range(body.n)}
    finals = []
    prompt_entries = None
    async for _, out in _outputs(started):
        for o in out.outputs:
            choices[o.index].add(o)
        if out.prompt_logprobs is not None:
            prompt_entries = out.prompt_logprobs
        if out.finished:
            finals.append(out)
    tools = tool_use(body)
    messages = {i: _assistant_message(c, tools) for i, c in choices.items()}
    result = p.ChatCompletionResponse(
        id=rid, created=created, model=ctx.model_name, usage=_usage(finals),
        prompt_logprobs=prompt_logprobs(ctx.tokenizer, jobs[0].prompt_ids, prompt_entries),
        choices=[p.ChatChoice(
            index=i, message=messages[i],
            finish_reason=_finish_reason(c.finish_reason, bool(messages[i].tool_calls)),
            stop_reason=c.stop_reason, token_ids=c.token_ids if body.return_token_ids else None,
            logprobs=p.ChatLogprobs(content=chat_logprobs(ctx.tokenizer, c.token_ids, c.logprobs,
                                                          c.top_logprobs)) if body.logprobs else None)
            for i, c in sorted(choices.items())])
    return Response(result.model_dump_json(), media_type="application/json")


def _assistant_message(choice: Choice, tools: ToolUse | None) -> p.AssistantMessage:
    call = None if tools is None else parse_call(choice.text, tools.names)
    if call is None:
        return p.AssistantMessage(content=choice.text)
    return p.AssistantMessage(content=None, tool_calls=[call])


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


async def chat_events(ctx: GatewayContext, body: p.ChatCompletionRequest, started: Started, rid: str,
                       created: int) -> AsyncIterator[str]:
    def chunk(choices: list[p.ChatStreamChoice], usage: p.UsageInfo | None = None) -> str:
        return _sse(p.ChatCompletionChunk(id=rid, created=created, model=ctx.model_name, choices=choices,
                                          usage=usage))

    for i in range(body.n):
        yield chunk([p.ChatStreamChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))])
    finals = []
    tools = tool_use(body)
    calls = {i: ToolCallStream(tools) for i in range(body.n)} if tools is not None else {}
    async for _, out in _outputs(started):
        for o in out.outputs:
            logprobs = p.ChatLogprobs(content=chat_logprobs(ctx.tokenizer, o.token_ids, o.logprobs or [],
                                                            o.top_logprobs)) if body.logprobs else None
            if o.index in calls:
                # The call's deltas first; the last chunk carries the rest of the increment.
                deltas = calls[o.index].add(o.text, o.finish_reason is not None)
                for delta in deltas[:-1]:
                    yield chunk([p.ChatStreamChoice(index=o.index, delta=delta)])
                delta = deltas[-1] if deltas else p.DeltaMessage()
                finish_reason = _finish_reason(o.finish_reason, calls[o.index].called)
            else:
                delta, finish_reason = p.DeltaMessage(content=o.text or None), o.finish_reason
            if (delta.content or delta.tool_calls or o.finish_reason or (logprobs is not None and logprobs.content)
                    or (body.return_token_ids and o.token_ids)):
                yield chunk([p.ChatStreamChoice(
                    index=o.index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                    token_ids=o.token_ids if body.return_token_ids else None)])
        if out.finished:
            finals.append(out)
    if body.include_usage:
        yield chunk([], _usage(finals))



# --- completions -----------------------------------------------------------------------------------

async def completion_response(ctx: GatewayContext, body: p.CompletionRequest, jobs: list[GenerationJob],
                               rid: str, created: int) -> Response:
    started = await start_jobs(ctx, jobs, None)
    choices = {job.first_index + i: Choice() for job in jobs for i in range(body.n)}
    finals = []
    prompt_entries: dict[int, list] = {}
    async for j, out in _outputs(started):
        for o in out.outputs:
            choices[jobs[j].first_index + o.index].add(o)
        if out.prompt_logprobs is not None:
            prompt_entries[j] = out.prompt_logprobs
        if out.finished:
            finals.append(out)
    owner = {job.first_index + i: (j, job) for j, job in enumerate(jobs) for i in range(body.n)}
    result_choices = []
    for index, c in sorted(choices.items()):
        j, job = owner[index]
        prefix = _prompt_text(ctx, job) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            offset = len(prefix)
            echoed = None
            if body.echo and j in prompt_entries:
                echoed = echo_logprobs(ctx.tokenizer, job.prompt_ids, prompt_entries[j], body.logprobs)
                offset = _end(echoed)
            logprobs = completion_logprobs(ctx.tokenizer, c.token_ids, c.logprobs, c.top_logprobs, offset)
            if echoed is not None:
                logprobs = _join(echoed, logprobs)
        result_choices.append(p.CompletionChoice(
            index=index, text=prefix + c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            token_ids=c.token_ids if body.return_token_ids else None,
            prompt_token_ids=job.prompt_ids if body.return_token_ids else None, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs(ctx.tokenizer, job.prompt_ids, prompt_entries.get(j))
            if body.prompt_logprobs is not None else None))
    result = p.CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=result_choices,
                                  usage=_usage(finals))
    return Response(result.model_dump_json(), media_type="application/json")


def _end(logprobs: p.CompletionLogprobs) -> int:
    """The text offset just past the last token (offsets count the tokens' own surfaces)."""
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else 0


def _join(first: p.CompletionLogprobs, second: p.CompletionLogprobs) -> p.CompletionLogprobs:
    return p.CompletionLogprobs(tokens=first.tokens + second.tokens,
                                token_logprobs=first.token_logprobs + second.token_logprobs,
                                top_logprobs=first.top_logprobs + second.top_logprobs,
                                text_offset=first.text_offset + second.text_offset)


def _prompt_text(ctx: GatewayContext, job: GenerationJob) -> str:
    return job.prompt_text if job.prompt_text is not None else ctx.tokenizer.decode(job.prompt_ids)


async def completion_events(ctx: GatewayContext, body: p.CompletionRequest, jobs: list[GenerationJob],
                             started: Started, rid: str, created: int) -> AsyncIterator[str]:
    def chunk(choices: list[p.CompletionChoice], usage: p.UsageInfo | None = None) -> str:
        return _sse(p.CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=choices,
                                         usage=usage))

    offsets = {}
    for j, job in enumerate(jobs):
        # The first output of each job carries its prompt logprobs when they were asked for.
        entries = started[j][0].prompt_logprobs
        for i in range(body.n):
            text = _prompt_text(ctx, job) if body.echo else ""
            offsets[job.first_index + i] = len(text)
            echoed = None
            if body.echo and body.logprobs is not None and entries is not None:
                echoed = echo_logprobs(ctx.tokenizer, job.prompt_ids, entries, body.logprobs)
                offsets[job.first_index + i] = _end(echoed)
            if body.echo or body.prompt_logprobs is not None:
                yield chunk([p.CompletionChoice(
                    index=job.first_index + i, text=text, logprobs=echoed,
                    prompt_logprobs=prompt_logprobs(ctx.tokenizer, job.prompt_ids, entries)
                    if body.prompt_logprobs is not None else None)])
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

