"""The gRPC API end to end: a grpc.aio server on 127.0.0.1 over a real AsyncEngine, driven by a
blocking grpcio client from the test thread (the server and engine run in their own event loop)."""
from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.engine.api import EngineDeadError, EngineUnavailableError, QueueFullError, StreamingEngineClient
from services.engine.async_engine import AsyncEngine, LocalEngineClient
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.gateway.grpc_server import GENERATION_SERVICE, RETRY_PUSHBACK_KEY, build_grpc_server
from services.gateway.proto import grok_serve_pb2 as pb
from services.gateway.proto import grok_serve_pb2_grpc as pb_grpc
from tests.conftest import golden_prompts
from tests.step_gate import StepGate
from tests.test_gateway_support import wait_until

KEY = "test-key-0123"
AUTH = (("authorization", f"Bearer {KEY}"),)
RPC_TIMEOUT = 60.0  # generous: the machine is shared, and nothing here should hang forever


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A started server in a private event loop on a daemon thread; `close()` stops everything."""

    def __init__(self, client: StreamingEngineClient, api_keys: frozenset[str] | None, beside: Served | None = None):
        """`beside`: share that server's event loop (an AsyncEngine serves only the loop it started in)."""
        self.client = client
        self.owns_loop = beside is None
        self.loop = asyncio.new_event_loop() if beside is None else beside.loop
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        if self.owns_loop:
            self.thread.start()
        for _ in range(5):  # another process may take the probed port before the server binds it
            self.port = _free_port()
            try:
                self.server = self.call(self._start(api_keys))
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("no free port for the test server")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def _start(self, api_keys):
        server = build_grpc_server(self.client, None, api_keys, "127.0.0.1", self.port)
        await server.start()
        return server

    def call(self, coro, timeout: float = RPC_TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        self.call(self.server.stop(None))
        if not self.owns_loop:
            return
        engine = getattr(self.client, "engine", None)
        if isinstance(engine, AsyncEngine):
            self.call(engine.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served():
    engine = AsyncEngine(LLMEngine(EngineConfig(model="tiny")))
    s = Served(LocalEngineClient(engine), frozenset({KEY, "another-key"}))
    yield s
    s.close()


class RemoteLikeClient:
    """Forwards to an engine client through a stream that neither cancellation nor closing reaches
    (and that stays referenced), like a remote call: only `abort` stops the request."""

    def __init__(self, inner: LocalEngineClient):
        self.inner = inner
        self.tokenizer, self.max_model_len = inner.tokenizer, inner.max_model_len
        self.streams: list = []
        self.aborted: list[str] = []

    @property
    def is_healthy(self) -> bool:
        return self.inner.is_healthy

    def generate(self, prompt_ids, params, request_id):
        stream = self.inner.generate(prompt_ids, params, request_id)
        self.streams.append(stream)

        class Unclosable:
            def __aiter__(self):
                return self

            async def __anext__(self):
                return await asyncio.shield(stream.__anext__())

        return Unclosable()

    async def abort(self, request_id):
        self.aborted.append(request_id)
        await self.inner.abort(request_id)


@pytest.fixture(scope="module")
def remote_like(served):
    s = Served(RemoteLikeClient(served.client), None, beside=served)
    yield s
    s.close()


def greedy(max_tokens: int, **extra) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)


def stream(stub, request, **kwargs) -> list[pb.GenerateResponse]:
    return list(stub.GenerateStream(request, metadata=AUTH, timeout=RPC_TIMEOUT, **kwargs))


def joined(parts: list[pb.GenerateResponse], index: int = 0) -> tuple[list[int], str]:
    seqs = [o for p in parts for o in p.outputs if o.index == index]
    return [t for o in seqs for t in o.token_ids], "".join(o.text for o in seqs)


def code_of(call, *args, **kwargs) -> grpc.RpcError:
    """The error a unary or server-streaming call ends with."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):  # a stream fails when read
            list(result)
    return info.value


# --- generation ------------------------------------------------------------------------------------
def test_stream_and_unary_agree_on_greedy_output(served):
    request = pb.GenerateRequest(text="The answer is", sampling_params=greedy(12))
    parts = stream(served.stub, request)
    unary = served.stub.Generate(request, metadata=AUTH, timeout=RPC_TIMEOUT)
    prompt = served.stub.Tokenize(pb.TokenizeRequest(text="The answer is"), metadata=AUTH).token_ids

    tokens, text = joined(parts)
    assert len(parts) >= 2 and parts[-1].finished and not any(p.finished for p in parts[:-1])
    assert len({p.request_id for p in parts}) == 1 and parts[0].request_id != unary.request_id
    assert len(unary.outputs) == 1 and unary.finished
    assert list(unary.outputs[0].token_ids) == tokens and len(tokens) == 12
    assert unary.outputs[0].text == text
    assert unary.outputs[0].finish_reason == parts[-1].outputs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    for usage in (parts[-1].usage, unary.usage):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(prompt), 12,
                                                                                       len(prompt) + 12)


def test_token_id_prompt_n_and_logprobs(served):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 80, 90, 100]),
                                 sampling_params=pb.SamplingParams(n=2, seed=7, max_tokens=5,
                                                                   ignore_eos=True, logprobs=2))
    unary = served.stub.Generate(request, metadata=AUTH, timeout=RPC_TIMEOUT)
    assert [o.index for o in unary.outputs] == [0, 1]
    for seq in unary.outputs:
        assert len(seq.token_ids) == len(seq.logprobs) == 5
        for token, lp in zip(seq.token_ids, seq.logprobs):
            assert lp.token_id == token and lp.logprob <= 0 and len(lp.top_logprobs) == 2
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (4, 10)


def test_logit_bias_priority_and_prompt_truncation(served):
    prompt = [1, 80, 90, 100, 110, 120]
    plain = served.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=greedy(4)),
                                 metadata=AUTH, timeout=RPC_TIMEOUT).outputs[0]
    # +100 forces a token at every step; -100 keeps the greedy first token from ever appearing.
    banned = plain.token_ids[0]
    forced = served.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=greedy(
        4, logit_bias={7: 100.0, banned: -100.0}, priority=-5)), metadata=AUTH, timeout=RPC_TIMEOUT)
    assert list(forced.outputs[0].token_ids) == [7] * 4
    # The last 3 prompt tokens, as if only they had been sent.
    cut = served.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=greedy(
        4, truncate_prompt_tokens=3)), metadata=AUTH, timeout=RPC_TIMEOUT)
    alone = served.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt[-3:]),
                                                    sampling_params=greedy(4)), metadata=AUTH, timeout=RPC_TIMEOUT)
    assert cut.usage.prompt_tokens == 3 and list(cut.outputs[0].token_ids) == list(alone.outputs[0].token_ids)


def test_tokenize_detokenize_round_trip(served):
    text = "Grok serves gRPC: ünïcödé ✓"
    ids = served.stub.Tokenize(pb.TokenizeRequest(text=text), metadata=AUTH).token_ids
    with_bos = served.stub.Tokenize(pb.TokenizeRequest(text=text, add_bos=True), metadata=AUTH)
    assert list(with_bos.token_ids) == [1, *ids] and with_bos.max_model_len == 2048
    back = served.stub.Detokenize(pb.DetokenizeRequest(token_ids=with_bos.token_ids), metadata=AUTH)
    assert back.text == text
    err = code_of(served.stub.Detokenize, pb.DetokenizeRequest(token_ids=[10**6]), metadata=AUTH)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- health, reflection, auth ---------------------------------------------------------------------
def test_health_is_open_and_serving(served):
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", GENERATION_SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), metadata=AUTH, timeout=RPC_TIMEOUT))
    names = {s.name for s in reply.list_services_response.service}
    assert {GENERATION_SERVICE, "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),),
                                      (("authorization", KEY),), (("authorization", "Bearer "),)])
def test_api_key_required(served, metadata):
    request = pb.GenerateRequest(text="hi", sampling_params=greedy(2))
    for call in (served.stub.Generate, served.stub.GenerateStream, served.stub.Tokenize):
        arg = pb.TokenizeRequest(text="hi") if call is served.stub.Tokenize else request
        err = code_of(call, arg, metadata=metadata, timeout=RPC_TIMEOUT)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, call
    alternative = (("authorization", "bearer another-key"),)
    assert served.stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=alternative).token_ids


# --- rejections -----------------------------------------------------------------------------------
@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(temperature=-1)), "temperature"),
    (pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(top_p=0)), "top_p"),
    (pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(max_tokens=4, min_tokens=5)),
     "min_tokens"),
    (pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(n=0)), "n"),
    (pb.GenerateRequest(sampling_params=greedy(2)), "prompt"),
    (pb.GenerateRequest(text="", sampling_params=greedy(2)), "empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 512]), sampling_params=greedy(2)), "512"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 2000), sampling_params=greedy(49)),
     "maximum context length"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 2048)), "maximum context length"),
    (pb.GenerateRequest(text="hi", sampling_params=greedy(2, logit_bias={5: 101.0})), "logit_bias"),
    (pb.GenerateRequest(text="hi", sampling_params=greedy(2, logit_bias={512: 1.0})), "logit_bias"),
    (pb.GenerateRequest(text="hi", sampling_params=greedy(2, truncate_prompt_tokens=0)), "truncate_prompt_tokens"),
])
def test_invalid_argument(served, request_, field):
    for call in (served.stub.Generate, served.stub.GenerateStream):
        err = code_of(call, request_, metadata=AUTH, timeout=RPC_TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details(), err.details()
    assert served.client.engine.engine.num_requests == 0  # nothing was queued


@pytest.mark.parametrize("how", ["stream deadline", "unary deadline", "stream cancelled"])
@pytest.mark.parametrize("via", ["engine", "remote-like"])
def test_a_call_that_ends_early_aborts_the_request(served, remote_like, how, via):
    target = served if via == "engine" else remote_like
    engine = served.client.engine.engine
    aborts, forwarded = engine.stats.aborts, len(remote_like.client.aborted)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 50, 60]), sampling_params=greedy(2000))
    metadata = AUTH if target is served else ()
    # The engine runs only the steps handed out here, so the call is mid-decode when it ends on any
    # machine: the deadline cannot be outrun and the cancelled stream cannot finish first.
    with StepGate(engine) as gate:
        if how == "stream cancelled":
            gate.allow(2)
            call = target.stub.GenerateStream(request, metadata=metadata, timeout=RPC_TIMEOUT)
            next(call), next(call)
            call.cancel()
            assert call.code() == grpc.StatusCode.CANCELLED
        else:
            gate.allow(1)  # the first token, then the engine holds until the deadline has passed
            received = []
            with pytest.raises(grpc.RpcError) as info:
                if how == "unary deadline":
                    target.stub.Generate(request, metadata=metadata, timeout=0.5)
                else:  # long enough for the one token that is allowed to arrive first
                    received.extend(target.stub.GenerateStream(request, metadata=metadata, timeout=5.0))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert how == "unary deadline" or received  # it was decoding when the deadline passed
        # The server gave the request up before the engine may run on.
        if target is served:
            assert wait_until(lambda: served.client.engine.num_unfinished == 0, 60)
        else:
            assert wait_until(lambda: len(remote_like.client.aborted) > forwarded, 60)
    assert wait_until(lambda: engine.num_requests == 0 and engine.stats.aborts > aborts
                      and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, 60)
    assert engine.stats.aborts == aborts + 1


# --- engine failures, with a client that needs no model ---------------------------------------------
class FailingClient:
    """An EngineClient whose generate raises `error`; reports `healthy`."""

    def __init__(self, tokenizer, error: BaseException, healthy: bool = True):
        self.tokenizer, self.error, self.healthy = tokenizer, error, healthy
        self.max_model_len = 64
        self.aborted: list[str] = []

    @property
    def is_healthy(self) -> bool:
        return self.healthy

    async def generate(self, prompt_ids, params, request_id):
        raise self.error
        yield  # an async generator, like the real clients

    async def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.mark.parametrize("error, healthy, code", [
    (QueueFullError("queue full", retry_after_s=1.5), True, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineDeadError("the engine stopped"), True, grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("boom"), True, grpc.StatusCode.INTERNAL),
    (EngineUnavailableError("no replica answered"), False, grpc.StatusCode.UNAVAILABLE),
])
def test_engine_failures_map_to_status_codes(served, error, healthy, code):
    client = FailingClient(served.client.tokenizer, error, healthy)
    assert isinstance(client, StreamingEngineClient)
    other = Served(client, api_keys=None)
    try:
        request = pb.GenerateRequest(text="hi", sampling_params=greedy(2))
        for call in (other.stub.Generate, other.stub.GenerateStream):
            err = code_of(call, request, timeout=RPC_TIMEOUT)
            assert err.code() == code
            assert "boom" not in err.details()  # internal errors are logged, not sent
            if isinstance(error, QueueFullError):
                assert (RETRY_PUSHBACK_KEY, "1500") in err.trailing_metadata()
        assert len(client.aborted) == 2  # harmless for a request that never started
        status = health_pb2_grpc.HealthStub(other.channel).Check(health_pb2.HealthCheckRequest(),
                                                                 timeout=RPC_TIMEOUT).status
        assert status == (health_pb2.HealthCheckResponse.SERVING if healthy
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        other.close()


def test_health_watch_follows_the_engine(served):
    client = FailingClient(served.client.tokenizer, EngineDeadError("dead"), healthy=True)
    other = Served(client, api_keys=None)
    try:
        watch = health_pb2_grpc.HealthStub(other.channel).Watch(
            health_pb2.HealthCheckRequest(service=GENERATION_SERVICE), timeout=RPC_TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        client.healthy = False  # noticed by the next poll, within a second
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    finally:
        other.close()


# --- the reference checkpoint ---------------------------------------------------------------------
def test_greedy_stream_matches_the_reference(tiny_reference, golden_f32):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_reference))))
    ref = Served(LocalEngineClient(engine), api_keys=None)
    try:
        calls = {}
        for j in golden_prompts(golden_f32):  # all in flight at once, so the engine batches them
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=golden_f32[f"prompt_{j}"].tolist()),
                                         sampling_params=greedy(len(golden_f32[f"greedy_{j}"])))
            calls[j] = ref.stub.GenerateStream(request, timeout=RPC_TIMEOUT)
        for j, call in calls.items():
            assert joined(list(call))[0] == golden_f32[f"greedy_{j}"].tolist(), f"prompt {j}"
    finally:
        ref.close()
