"""Chat messages to a prompt string, through a sandboxed Jinja2 template.

Grok-1 is a base model without a chat format of its own, so the default template writes a plain
transcript that a base model continues naturally. Each message becomes "<Role>: <content>" with the
role capitalised ("System", "User", "Assistant") and the content stripped of surrounding whitespace;
messages are separated by a blank line, and `add_generation_prompt` appends "Assistant:" so the model
writes the next turn:

    System: You are a helpful assistant.

    User: Hello!

    Assistant: Hi! How can I help?

    User: Name a prime.

    Assistant:

There is no trailing space after the final "Assistant:": the model's first piece carries its own leading
space ("▁2"). A base model tends to go on with the next "User:" turn, so `ChatTemplate.stop` holds the
stop strings that end the reply ("\\nUser:", "\\nSystem:"); a user template has none unless given.
The transcript is plain text: message content that itself contains "\\n\\nUser:" reads like a new turn.

Tools (OpenAI's `tools`, when the request lets the model call them) open the transcript as a system
turn that lists each function's definition as JSON, one per line, after the calling convention:

    System: You can call these functions. To call one, reply with only
    <tool_call>{"name":<the function's name>,"arguments":<its arguments as a JSON object>}</tool_call>
    {"description": "Weather in a city", "name": "get_weather", "parameters": {...}}

    User: Weather in Paris?

    Assistant: <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

    Tool: 22 C, sunny

    Assistant:

An assistant message's `tool_calls` follow its content in that same form; a `tool` message (a tool's
result) is a "Tool:" turn. "\nTool:" is a stop string too, so the model does not invent results.

Templates see `messages` (a list of dicts: "role", "content" as one string, other keys of the message
unchanged, e.g. "tool_calls" and "tool_call_id"), `tools` (the request's tool definitions, as Hugging
Face templates expect them, or None), `add_generation_prompt`, and `raise_exception(message)`, the helper
that Hugging Face chat templates call. They render with trim_blocks and lstrip_blocks, as Hugging Face renders them.
Content may be a string or a list of {"type": "text", "text": ...} parts, joined with "\\n".
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_STOP = ("\nUser:", "\nSystem:", "\nTool:")
TOOLS_PREAMBLE = ("You can call these functions. To call one, reply with only\n"
                  '<tool_call>{"name":<the function\'s name>,"arguments":<its arguments as a JSON object>}'
                  "</tool_call>")

DEFAULT_TEMPLATE = (
    "{%- if tools -%}"
    "System: " + TOOLS_PREAMBLE.replace("'", "\\'").join(("{{ '", "' }}")) +
    "{%- for tool in tools %}{{ '\\n' }}{{ tool.function | tojson }}{% endfor -%}"
    "{%- if messages %}{{ '\\n\\n' }}{% endif -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{{ message.role | capitalize }}: {{ message.content | trim }}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if message.content | trim or not loop.first %} {% endif -%}"
    "<tool_call>{\"name\":{{ call.function.name | tojson }},\"arguments\":{{ call.function.arguments }}}</tool_call>"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif -%}"
)


class InvalidMessagesError(ValueError):
    """Messages the template cannot render; a ValueError, so request validation can report it as such."""


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _message_text(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        raise InvalidMessagesError(f"messages[{index}].content must be a string or a list of text parts, "
                         f"got {type(content).__name__}")
    texts = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, Mapping):
            raise InvalidMessagesError(f"{where} must be an object, got {type(part).__name__}")
        if part.get("type") != "text":
            raise InvalidMessagesError(f"{where} has type {part.get('type')!r}: only text parts are "
                                       "supported")
        if not isinstance(part.get("text"), str):
            raise InvalidMessagesError(f"{where}.text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_messages(messages: object) -> list[dict[str, Any]]:
    """Validate OpenAI-style messages and flatten their content to strings (the caller's are not changed)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes, bytearray)):
        raise InvalidMessagesError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise InvalidMessagesError("messages must not be empty")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidMessagesError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidMessagesError(f"messages[{index}] has unknown role {role!r}; expected one of "
                                       f"{', '.join(ROLES)}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""  # OpenAI's shape of an assistant turn that only calls tools
        elif "content" not in message:
            raise InvalidMessagesError(f"messages[{index}] has no content")
        normalized.append({**message, "content": _message_text(content, index)})
    return normalized


class ChatTemplate:
    """A compiled chat template; `name` (the file, or "default") appears in every error it raises."""

    def __init__(self, source: str, name: str = "<string>", stop: Sequence[str] = ()) -> None:
        # Templates may come from users: the immutable sandbox blocks attribute tricks and mutation.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template {name}, line {exc.lineno}: {exc.message}") from exc
        self.name = name
        self.source = source
        self.stop: tuple[str, ...] = tuple(stop)

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_TEMPLATE, name="default", stop=DEFAULT_STOP)

    @classmethod
    def from_file(cls, path: str | Path, stop: Sequence[str] = ()) -> ChatTemplate:
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"chat template file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"chat template {path} is not UTF-8 text: {exc}") from None
        return cls(source, name=str(path), stop=stop)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """`tools`: OpenAI tool definitions ({"type": "function", "function": {...}}) the model may call."""
        normalized = normalize_messages(messages)
        try:
            return self._template.render(messages=normalized, add_generation_prompt=add_generation_prompt,
                                         tools=list(tools) if tools else None)
        except Exception as exc:  # anything a template raises is the template's error, e.g. 1 + "a"
            raise ValueError(f"chat template {self.name} failed to render: {exc}") from exc
