"""truncate_prompt_tokens (vLLM's): the model sees only the last k prompt tokens, and the context-length
check applies to what is left. Through the openai client against a local server."""
from __future__ import annotations

import httpx
import pytest

from tests.test_gateway_support import LocalServer, assert_rejected, openai_client, tiny_config

pytestmark = pytest.mark.timeout(180)

PROMPT = list(range(300, 320))  # 20 token ids
GREEDY = {"temperature": 0, "max_tokens": 6}
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def served():
    with LocalServer(tiny_config()) as server, openai_client(server) as client:
        yield server, client


def _complete(client, prompt, **extra):
    return client.completions.create(model="tiny", prompt=prompt, extra_body={**EXTRA, **extra}, **GREEDY)


@pytest.mark.parametrize("keep", [1, 5, 19])
def test_the_last_k_tokens_are_what_the_model_sees(served, keep):
    _, client = served
    truncated = _complete(client, PROMPT, truncate_prompt_tokens=keep)
    alone = _complete(client, PROMPT[-keep:])
    assert truncated.usage.prompt_tokens == keep
    assert truncated.choices[0].model_extra["prompt_token_ids"] == PROMPT[-keep:]
    assert truncated.choices[0].model_extra["token_ids"] == alone.choices[0].model_extra["token_ids"]
    assert truncated.choices[0].text == alone.choices[0].text


def test_k_at_least_the_prompt_changes_nothing(served):
    _, client = served
    whole = _complete(client, PROMPT)
    for keep in (20, 128):
        out = _complete(client, PROMPT, truncate_prompt_tokens=keep)
        assert out.usage.prompt_tokens == 20
        assert out.choices[0].model_extra["token_ids"] == whole.choices[0].model_extra["token_ids"]


def test_text_prompts_echo_what_was_kept(served):
    server, client = served
    text = "The quick brown fox jumps over the lazy dog"
    ids = server.context.tokenizer.encode(text)
    assert len(ids) > 4
    out = client.completions.create(model="tiny", prompt=text, echo=True, max_tokens=1, temperature=0,
                                    extra_body={**EXTRA, "truncate_prompt_tokens": 4})
    assert out.usage.prompt_tokens == 4
    assert out.choices[0].text.startswith(server.context.tokenizer.decode(ids[-4:]))
    assert not out.choices[0].text.startswith(text)


def test_chat_truncates_the_rendered_conversation(served):
    _, client = served
    messages = [{"role": "user", "content": "a fairly long message to be cut down to a few tokens"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    out = client.chat.completions.create(model="tiny", messages=messages, extra_body={"truncate_prompt_tokens": 3},
                                         **GREEDY)
    assert whole.usage.prompt_tokens > 3 and out.usage.prompt_tokens == 3


def test_a_prompt_over_the_context_fits_once_truncated(served):
    server, client = served
    long_prompt = [300 + i % 50 for i in range(200)]  # max_model_len is 128
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 6}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    out = _complete(client, long_prompt, truncate_prompt_tokens=100)
    assert out.usage.prompt_tokens == 100 and out.usage.completion_tokens == 6
    # What is kept still has to leave room for max_tokens.
    over = httpx.post(server.url + "/v1/completions", timeout=60,
                      json={"prompt": long_prompt, "max_tokens": 30, "truncate_prompt_tokens": 100})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("keep", [0, -1, 129, "5", 2.0, True])
def test_bad_k_is_400_naming_it(served, keep):
    server, _ = served
    assert_rejected(server, "truncate_prompt_tokens", keep)
