"""The OpenAI-compatible API in process (uvicorn + a real AsyncEngine on the tiny preset, no Ray),
driven with the official openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import httpx
import openai
import pytest

from services.gateway.openai_api import build_context, create_app
from services.gateway.protocol import ChatCompletionRequest
from tests.step_gate import StepGate
from tests.test_gateway_support import LocalServer, metric, tiny_config, wait_until

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server():
    with LocalServer(tiny_config()) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models_version_and_request_id(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == 128
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    given = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                       headers={"X-Request-Id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42" and given.json()["id"] == "cmpl-trace-42"
    made = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert len(made.headers["x-request-id"]) == 32
    # A header that could smuggle anything into logs or headers is replaced, not echoed.
    odd = httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "a b<script>"})
    assert odd.headers["x-request-id"] != "a b<script>"


def test_completion_with_the_openai_client(client):
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=7, **GREEDY)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 7 and out.usage.total_tokens == 12


def test_prompt_forms_and_choice_indices(client):
    texts = client.completions.create(model="tiny", prompt=["ab", "cde"], max_tokens=3, n=2, seed=3,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    assert texts.usage.prompt_tokens == 5 and texts.usage.completion_tokens == 12
    ids = client.completions.create(model="tiny", prompt=[10, 11, 12], max_tokens=2, **GREEDY)
    assert ids.usage.prompt_tokens == 3
    batch = client.completions.create(model="tiny", prompt=[[10, 11], [12, 13, 14]], max_tokens=2, **GREEDY)
    assert len(batch.choices) == 2 and batch.usage.prompt_tokens == 5


def test_token_ids_echo_and_greedy_determinism(server):
    body = {"prompt": "Hi there", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    first = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    again = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    assert len(first["token_ids"]) == 6 and first["token_ids"] == again["token_ids"]
    assert first["prompt_token_ids"] == server.context.tokenizer.encode("Hi there")
    assert first["text"] == server.context.tokenizer.decode(first["token_ids"])
    echoed = httpx.post(server.url + "/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == "Hi there" + first["text"]


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen >= max(top.values()) - 1e-5  # greedy: the chosen token is the most likely
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_with_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                         max_completion_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 4
    content = choice.logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list) and len(entry.top_logprobs) == 2
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-5)


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_with_usage(client):
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=5, stream=True, n=2, seed=1,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True}))
    per_choice = {0: [], 1: []}
    for c in chunks[:-1]:
        per_choice[c.choices[0].index] += c.choices[0].model_extra.get("token_ids") or []
    assert [len(v) for v in per_choice.values()] == [5, 5]
    assert chunks[-1].usage.completion_tokens == 10


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt="x", max_tokens=8, temperature=1.0, seed=seed,
                                         n=2, extra_body={"ignore_eos": True, "return_token_ids": True})

    a, b, c = sample(7), sample(7), sample(8)
    ids = [[ch.model_extra["token_ids"] for ch in r.choices] for r in (a, b, c)]
    assert ids[0] == ids[1]
    assert ids[0][0] != ids[0][1]  # the n sequences differ
    assert ids[0] != ids[2]


def test_stop_string_cuts_the_text(client):
    base = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, **GREEDY).choices[0].text
    if len(base) < 4:
        pytest.skip("the random model wrote too little text here")
    stop = base[2:4]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, stop=[stop], **GREEDY)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == base[:base.find(stop)]


def test_stop_token_ids_end_with_stop(client):
    ids = client.completions.create(model="tiny", prompt="Hello", max_tokens=6,
                                    extra_body={"ignore_eos": True, "return_token_ids": True},
                                    temperature=0).choices[0].model_extra["token_ids"]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True,
                                                "stop_token_ids": [ids[2]]}).choices[0]
    assert out.finish_reason == "stop" and out.model_extra["token_ids"] == ids[:ids.index(ids[2]) + 1]


def test_tokenize_and_detokenize(server):
    tok = server.context.tokenizer
    out = httpx.post(server.url + "/tokenize", json={"prompt": "héllo"}).json()
    assert out["tokens"] == tok.encode("héllo") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 128
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == tok.encode("User: Hi\n\nAssistant:")
    back = httpx.post(server.url + "/detokenize", json={"tokens": out["tokens"]}).json()
    assert back == {"prompt": "héllo"}


def test_client_disconnect_aborts_and_frees_blocks(server):
    before = httpx.get(server.url + "/metrics").text
    body = {"prompt": "Tell me a long story", "max_tokens": 100, "ignore_eos": True, "stream": True}
    streams = server.client.engine
    # The engine runs only the steps this test hands out, so neither request can finish before its
    # client leaves, however fast the machine.
    with StepGate(server.engine) as gate:
        gate.allow(1)  # the prefill, which streams the first token
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        # Non-streaming too: the client gives up (timeout), the server notices the disconnect.
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        # Both requests are abandoned (their streams closed) while the engine still holds them.
        assert wait_until(lambda: streams.num_unfinished == 0, 60)

    def settled():
        text = httpx.get(server.url + "/metrics").text
        return (metric(text, "grok_serve:request_aborts_total") - metric(before, "grok_serve:request_aborts_total")
                >= 2 and metric(text, "grok_serve:kv_cache_usage_perc") == 0
                and metric(text, "grok_serve:num_requests_running") == 0)

    assert wait_until(settled, 60), httpx.get(server.url + "/metrics").text[:2000]
    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "grok_serve:request_disconnects_total") - metric(
        before, "grok_serve:request_disconnects_total") == 2
    assert metric(after, "grok_serve:request_success_total", finished_reason="abort") - metric(
        before, "grok_serve:request_success_total", finished_reason="abort") == 2
    # Cut off where their clients left: the stream's first token and the one step the gate was
    # holding when it opened, none for the request that never ran.
    assert metric(after, "grok_serve:generation_tokens_total") - metric(
        before, "grok_serve:generation_tokens_total") <= 3


def test_multiple_prompts_stream_all_choices(server):
    body = {"prompt": ["a", "b", "c"], "max_tokens": 3, "stream": True, "ignore_eos": True,
            "return_token_ids": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    tokens = {}
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        tokens.setdefault(choice["index"], []).extend(choice.get("token_ids") or [])
    assert {i: len(t) for i, t in tokens.items()} == {0: 3, 1: 3, 2: 3}


def test_a_user_chat_template_and_its_stop_strings(server, tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    config = dataclasses.replace(server.context.config, chat_template=str(path), chat_template_stop=("</s>",))
    context = build_context(config, server.client)
    assert context.template.stop == ("</s>",)

    async def tokenize():
        transport = httpx.ASGITransport(create_app(context))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.post("/tokenize", json={"messages": [{"role": "developer", "content": "Be brief"},
                                                               {"role": "user", "content": "Hi"}]})).json()

    tokens = asyncio.run(tokenize())["tokens"]
    assert tokens == server.context.tokenizer.encode("<system>Be brief<user>Hi<assistant>")
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], stop="END")
    assert request.sampling_params(4, None, context.template.stop).stop == ("END", "</s>")
