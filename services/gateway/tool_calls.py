"""Tool calling in OpenAI's shape over a base model: what `tool_choice` asks of the output, and the
model's text back into `tool_calls`.

The model writes a call as the chat template documents it (services/model/chat_template.py):
`<tool_call>{"name":...,"arguments":{...}}</tool_call>`.

- `none` (the default without tools): tools are not shown to the model; the answer is plain content.
- `auto` (the default with tools): tools are shown and the output is free. A base model follows the
  convention only as far as its transcript leads it: when the answer starts with a call that parses
  and names a given function, it becomes `tool_calls` (finish_reason "tool_calls"); anything else is
  plain content. "</tool_call>" is a stop string, so a call ends the answer.
- `required` / a named function: the output is constrained by the grammar engine to exactly one call
  of one of the given functions (of that function), its arguments matching the function's
  `parameters` schema, so they always parse. `parallel_tool_calls` is accepted; one call is made.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from services.engine.api import Rejection, RequestRejected
from services.engine.structured_output import StructuredOutput
from services.gateway import protocol as p

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')
_HEADER = re.compile(r"\s*" + re.escape(OPEN) + _PREFIX.pattern)
_SCHEMA_DEFS = ("$defs", "definitions")


@dataclass(frozen=True)
class ToolUse:
    """What a chat request's tools ask for: `mode` is auto, required or named (tools with `none` need
    nothing); `constraint` constrains the output for required and named."""

    mode: str
    tools: tuple[p.ToolDefinition, ...]
    constraint: StructuredOutput | None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.function.name for t in self.tools)

    def template_tools(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools]


def _reject(message: str, param: str = "tools") -> RequestRejected:
    return RequestRejected(Rejection(message, param))


def tool_use(body: p.ChatCompletionRequest) -> ToolUse | None:
    """None when the model is not to call tools; RequestRejected for inconsistent tool fields."""
    choice = body.tool_choice
    tools = tuple(body.tools or ())
    if not tools:
        if choice not in (None, "none"):
            raise _reject("tool_choice needs tools", "tool_choice")
        return None
    for i, tool in enumerate(tools):
        if not _NAME.fullmatch(tool.function.name):
            raise _reject(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got "
                          f"{tool.function.name!r}")
    if len({t.function.name for t in tools}) != len(tools):
        raise _reject("tools: function names must be distinct")
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        return ToolUse("auto", tools, None)
    if choice == "required":
        return ToolUse("required", tools, _call_constraint(tools))
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        raise _reject(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                      "tool_choice")
    return ToolUse("named", tools, _call_constraint(tuple(named)))


def _call_schema(tool: p.ToolDefinition) -> dict[str, Any]:
    """One call of `tool` as a JSON schema; the parameters' own definitions move to the root, where
    their "#/$defs/..." references point."""
    parameters = dict(tool.function.parameters or {"type": "object"})
    defs = {key: parameters.pop(key) for key in _SCHEMA_DEFS if key in parameters}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False}, **defs}


def _call_constraint(tools: tuple[p.ToolDefinition, ...]) -> StructuredOutput:
    # The leading space: the transcript reads "Assistant: <tool_call>...".
    rules = [f'start: " {OPEN}" call "{CLOSE}"', "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    rules += [f"call_{i}: %json {json.dumps(_call_schema(t), ensure_ascii=False)}" for i, t in enumerate(tools)]
    return StructuredOutput("grammar", "\n".join(rules), "tools")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str, names: frozenset[str]) -> p.ToolCall | None:
    """The call `text` holds (the whole answer, its closing tag optional), or None."""
    body = text.strip()
    if not body.startswith(OPEN):
        return None
    body = body[len(OPEN):].removesuffix(CLOSE).strip()
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if (not isinstance(call, dict) or set(call) != {"name", "arguments"} or call["name"] not in names
            or not isinstance(call["arguments"], dict)):
        return None
    # The arguments as generated when the call is laid out compactly (what streaming sends), else
    # re-serialised.
    prefix = _PREFIX.match(body)
    raw = body[prefix.end():-1] if prefix and body.endswith("}") else None
    arguments = raw if raw is not None and _same_json(raw, call["arguments"]) else json.dumps(
        call["arguments"], ensure_ascii=False)
    return p.ToolCall(id=new_call_id(), function=p.FunctionCall(name=call["name"], arguments=arguments))


def _same_json(text: str, value: Any) -> bool:
    try:
        return json.loads(text) == value
    except ValueError:
        return False


class ToolCallStream:
    """Turns one choice's text increments into chat deltas: content, or a tool call's header and then
    its arguments as they are generated (constrained calls), or the whole call at the end (auto)."""

    def __init__(self, use: ToolUse):
        self._use = use
        self._text = ""
        self._plain = False  # decided: the answer is content
        self._call_id: str | None = None
        self._sent_args = 0  # characters of the arguments already sent
        self._args_start = 0

    @property
    def called(self) -> bool:
        return self._call_id is not None

    def add(self, text: str, finished: bool) -> list[p.DeltaMessage]:
        if self._plain:
            return [p.DeltaMessage(content=text)] if text else []
        self._text += text
        if self._use.constraint is None:
            return self._auto(finished)
        return self._constrained(finished)

    def _auto(self, finished: bool) -> list[p.DeltaMessage]:
        head = self._text.lstrip()
        if not finished and (OPEN.startswith(head) or head.startswith(OPEN)):
            return []  # may still become a call: hold it back
        call = parse_call(self._text, self._use.names) if head.startswith(OPEN) else None
        if call is not None:
            self._call_id = call.id
            return [p.DeltaMessage(tool_calls=[p.DeltaToolCall(
                index=0, id=call.id, type="function",
                function=p.DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))])]
        self._plain = True
        return [p.DeltaMessage(content=self._text)] if self._text else []

    def _constrained(self, finished: bool) -> list[p.DeltaMessage]:
        deltas = []
        if self._call_id is None:
            header = _HEADER.match(self._text)
            if header is None:
                if finished and self._text:
                    self._plain = True  # cut short before the name was complete
                    return [p.DeltaMessage(content=self._text)]
                return []
            self._call_id = new_call_id()
            self._args_start = header.end()
            deltas.append(p.DeltaMessage(tool_calls=[p.DeltaToolCall(
                index=0, id=self._call_id, type="function",
                function=p.DeltaFunctionCall(name=json.loads(header.group(1)), arguments=""))]))
        args = self._text[self._args_start:]
        if finished:
            args = args.removesuffix("}" + CLOSE)
        else:
            # The call's closing "}</tool_call>" is not part of the arguments: hold back that much.
            args = args[:max(0, len(args) - len("}" + CLOSE))]
        if len(args) > self._sent_args:
            deltas.append(p.DeltaMessage(tool_calls=[p.DeltaToolCall(
                index=0, function=p.DeltaFunctionCall(arguments=args[self._sent_args:]))]))
            self._sent_args = len(args)
        return deltas
