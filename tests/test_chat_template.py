"""Chat templates: the default base-model transcript, user templates from files, and their errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.model.chat_template import ChatTemplate, InvalidMessagesError

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": [{"type": "text", "text": "Hi! How can I help?"}]},
    {"role": "user", "content": "  Name a prime.\n"},
]


def write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "chat.jinja"
    path.write_text(source, encoding="utf-8")
    return path


def test_default_format() -> None:
    prompt = ChatTemplate.default().render(CONVERSATION)
    assert prompt == ("System: You are a helpful assistant.\n\nUser: Hello!\n\n"
                      "Assistant: Hi! How can I help?\n\nUser: Name a prime.\n\nAssistant:")


def test_default_without_generation_prompt() -> None:
    prompt = ChatTemplate.default().render(CONVERSATION[1:2], add_generation_prompt=False)
    assert prompt == "User: Hello!"


def test_text_parts_are_joined_by_newlines() -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    messages = [{"role": "user", "content": parts}]
    assert ChatTemplate.default().render(messages) == "User: one\ntwo\n\nAssistant:"


def test_default_stop_strings_end_the_reply() -> None:
    template = ChatTemplate.default()
    assert "\nUser:" in template.stop
    assert all(stop not in template.render(CONVERSATION[:1]) for stop in template.stop)


@pytest.mark.parametrize(("messages", "match"), [
    ([], "empty"),
    ("User: hi", "list"),
    ([{"role": "function", "content": "x"}], "unknown role 'function'"),
    ([{"content": "x"}], "unknown role None"),
    ([{"role": "user"}], "no content"),
    ([{"role": "user", "content": None}], "string or a list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
    ([{"role": "user", "content": ["plain"]}], "must be an object"),
])
def test_invalid_messages(messages: object, match: str) -> None:
    assert issubclass(InvalidMessagesError, ValueError)
    with pytest.raises(InvalidMessagesError, match=match):
        ChatTemplate.default().render(messages)  # type: ignore[arg-type]


def test_template_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "{% for m in messages %}<|{{ m.role }}|>{{ m.name or '' }}\n{{ m.content }}\n"
                           "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    template = ChatTemplate.from_file(path, stop=["<|user|>"])
    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    assert template.render(messages) == "<|user|>ann\nhi\n<|assistant|>\n"
    assert template.render(messages, add_generation_prompt=False) == "<|user|>ann\nhi\n"
    assert template.stop == ("<|user|>",)


def test_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "{% for m in messages %}{{ m.role }\n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ChatTemplate.from_file(path)


def test_render_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "{{ raise_exception('system messages are not supported') }}")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*system messages are not supported"):
        ChatTemplate.from_file(path).render(CONVERSATION)
    path = write(tmp_path, "{{ 1 + messages }}")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ChatTemplate.from_file(path).render(CONVERSATION)


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ ''.__class__.__subclasses__() }}",
])
def test_sandbox_blocks_unsafe_templates(tmp_path: Path, source: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        ChatTemplate.from_file(write(tmp_path, source)).render(CONVERSATION)


def test_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.jinja"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")
    path = tmp_path / "binary.jinja"
    path.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match=r"binary\.jinja"):
        ChatTemplate.from_file(path)


def test_messages_are_not_modified() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    ChatTemplate.default().render(messages)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
