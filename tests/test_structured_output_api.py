"""Structured outputs through the HTTP API with the unmodified openai client, on the random-weight
tiny model: every output parses and validates, a constraint that cannot compile is a 400 naming it, and
a request running beside it is unaffected. Seeded sampling makes every output deterministic."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import openai
import pydantic
import pytest

from services.engine.api import RequestLimits
from services.engine.config import EngineConfig
from services.gateway.config import AppConfig
from tests.test_gateway_support import LocalServer
from tests.test_structured_output import SCHEMAS

MODEL = "tiny"


@pytest.fixture(scope="module")
def server():
    engine = EngineConfig(model="tiny", max_model_len=1024, kv_cache_memory_bytes=16 << 20)
    with LocalServer(AppConfig(engine=engine, limits=RequestLimits(max_structured_output_chars=4000))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def _chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Data?"}],
                                          max_tokens=500, seed=kwargs.pop("seed", 1), **kwargs)


def test_json_schema_on_chat_and_completions(client):
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        chat = _chat(client, response_format=fmt, seed=i)
        assert chat.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
        completion = client.completions.create(model=MODEL, prompt="Data:", max_tokens=500, seed=i,
                                               extra_body={"response_format": fmt})
        jsonschema.validate(json.loads(completion.choices[0].text), schema)


def test_json_object_and_vllm_fields(client):
    obj = _chat(client, response_format={"type": "json_object"}, seed=7)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = r"[A-Z][a-z]{1,5} [0-9]{2}"
    for body in ({"guided_regex": regex}, {"structured_outputs": {"regex": regex}}):
        text = _chat(client, extra_body=body).choices[0].message.content
        assert re.fullmatch(regex, text), text
    choices = ["alpha", "beta", "gamma"]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        out = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=20, seed=3, extra_body=body)
        assert out.choices[0].text in choices and out.choices[0].finish_reason == "stop"
    for body in ({"guided_json": SCHEMAS[2]}, {"structured_outputs": {"json": SCHEMAS[2]}}):
        jsonschema.validate(json.loads(_chat(client, extra_body=body).choices[0].message.content), SCHEMAS[2])
    grammar = 'start: "ok" | "n" /[0-9]/'
    for body in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        assert re.fullmatch(r"ok|n[0-9]", _chat(client, extra_body=body).choices[0].message.content)


def test_streamed_structured_output_parses(client):
    text = "".join(c.choices[0].delta.content or "" for c in _chat(
        client, stream=True, response_format={"type": "json_schema",
                                              "json_schema": {"name": "s", "schema": SCHEMAS[0]}}) if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[0])


class Pet(pydantic.BaseModel):
    kind: str = pydantic.Field(max_length=5)
    legs: int
    tame: bool
    tags: list[str] = pydantic.Field(max_length=2)


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    pets: list[Pet] = pydantic.Field(max_length=2)


def test_openai_parse_with_a_pydantic_model(client):
    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Owner?"}],
                                           response_format=Owner, max_tokens=600, seed=5)
    owner = parsed.choices[0].message.parsed
    assert isinstance(owner, Owner) and all(isinstance(p, Pet) for p in owner.pets)
    assert owner == Owner.model_validate_json(parsed.choices[0].message.content)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuch"}}}},
     "response_format", "nosuch"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs", "missing_rule"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"guided_regex": "a" * 4001}, "guided_regex", "max_structured_output_chars"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
])
def test_bad_constraints_are_a_400_naming_the_problem(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, extra_body=body)
    assert info.value.body["param"] == param and words in info.value.body["message"]


def test_a_bad_schema_leaves_a_running_request_alone(client, server):
    plain = {"max_tokens": 300, "seed": 9, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    alone = client.completions.create(model=MODEL, prompt="Story:", **plain).choices[0].token_ids
    tokens: list[int] = []
    first = threading.Event()

    def run():
        stream = client.completions.create(model=MODEL, prompt="Story:", stream=True, **plain)
        for chunk in stream:
            tokens.extend(chunk.choices[0].model_extra.get("token_ids") or [])
            first.set()

    runner = threading.Thread(target=run)
    runner.start()
    assert first.wait(120)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                  extra_body={"guided_json": {"type": "object", "required": 5}})
    runner.join(300)
    assert tokens == alone and len(tokens) == 300
    assert not server.engine.has_unfinished()
