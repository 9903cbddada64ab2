"""Tool calling in OpenAI's shape with the unmodified openai client, on the random-weight tiny model:
with `required` or a named function the call is constrained, so its arguments always parse and match
the function's schema; `auto` turns a call the model writes in the template's convention into
`tool_calls`; assistant `tool_calls` and `tool` messages replay into the transcript."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from services.engine.config import EngineConfig
from services.gateway import protocol as p
from services.gateway.config import AppConfig
from services.gateway.tool_calls import ToolCallStream, ToolUse, parse_call
from services.model.chat_template import ChatTemplate
from tests.test_gateway_support import LocalServer

MODEL = "tiny"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    engine = EngineConfig(model="tiny", max_model_len=2048, kv_cache_memory_bytes=16 << 20)
    with LocalServer(AppConfig(engine=engine)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def _check_call(call, names=("get_weather", "add")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_calls_always_parse(client):
    seen = set()
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             max_tokens=300, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        _check_call(call)
        seen.add(call.function.name)
    for name in SCHEMAS:
        out = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=300, seed=1,
            tool_choice={"type": "function", "function": {"name": name}})
        [call] = out.choices[0].message.tool_calls
        _check_call(call, (name,))
        assert out.choices[0].finish_reason == "tool_calls"


def test_streamed_call_deltas_assemble_into_the_call(client):
    kwargs = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 300, "seed": 2,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    ids, names, arguments, finish, content = set(), [], "", None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                ids |= {delta.id} if delta.id else set()
                names += [delta.function.name] if delta.function.name else []
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert len(ids) == 1 and names == ["get_weather"] and finish == "tool_calls" and content == ""
    assert arguments == whole.function.arguments
    _check_call(openai.types.chat.ChatCompletionMessageToolCall(
        id=ids.pop(), type="function", function={"name": names[0], "arguments": arguments}))


def test_a_conversation_with_tool_calls_and_results_replays(client):
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"C"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=20, seed=3)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert (choice.message.content is None) == bool(choice.message.tool_calls)
    # The tiny model's tokenizer has one token per byte: the prompt is exactly the documented transcript.
    transcript = ChatTemplate.default().render(messages, tools=TOOLS)
    assert '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"C"}}</tool_call>' in transcript
    assert out.usage.prompt_tokens == len(transcript.encode())
    none = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=5, seed=3)
    assert none.choices[0].message.tool_calls is None or none.choices[0].message.tool_calls == []
    assert none.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nosuch"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nosuch"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_fields_are_a_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, **body)
    assert info.value.body["param"] == param


# --- auto: parsing what the model writes --------------------------------------------------------------

def _use(mode="auto"):
    tools = tuple(p.ToolDefinition.model_validate(t) for t in TOOLS)
    return ToolUse(mode, tools, None)


def test_auto_parses_a_call_in_the_documented_format_and_leaves_anything_else_as_content():
    names = _use().names
    call = parse_call(' <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', names)
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}
    compact = parse_call('<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>', names)
    assert compact.function.arguments == '{"a":1,"b":2}'
    for text in ("Sunny.", '<tool_call>{"name": "nosuch", "arguments": {}}', "<tool_call>{broken",
                 'Sure: <tool_call>{"name": "add", "arguments": {}}'):
        assert parse_call(text, names) is None


def test_auto_stream_holds_back_a_possible_call_and_releases_content():
    stream = ToolCallStream(_use())
    assert stream.add(" <tool", False) == []
    assert [d.content for d in stream.add("bar>", False)] == [" <toolbar>"]
    assert [d.content for d in stream.add(" more", True)] == [" more"]
    stream = ToolCallStream(_use())
    assert stream.add(' <tool_call>{"name": "add", ', False) == []
    [delta] = stream.add('"arguments": {"a": 1, "b": 2}}', True)
    assert delta.tool_calls[0].function.name == "add" and stream.called


def test_template_renders_tools_calls_and_results():
    text = ChatTemplate.default().render(
        [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":2}'}}]},
         {"role": "tool", "content": "3"}], tools=TOOLS)
    assert text.startswith("System: You can call these functions.")
    assert '"name": "get_weather"' in text
    assert 'Assistant: <tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n\nTool: 3\n\nAssistant:' in text
