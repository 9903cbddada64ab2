"""logit_bias (OpenAI semantics): token ids as string keys, biases in [-100, 100] added to the logits
before sampling; reported logprobs stay the model's own. Sampler rows, parameter checks, and the HTTP
API through the openai client."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from services.engine.api import RequestRejected
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from tests.test_gateway_support import LocalServer, assert_rejected, openai_client, tiny_config

pytestmark = pytest.mark.timeout(180)

GREEDY = {"temperature": 0, "max_tokens": 8}


# --- parameters and sampler ------------------------------------------------------------------------
def test_params_keep_sorted_pairs():
    params = SamplingParams(logit_bias={7: -1, 3: 2.5})
    assert params.logit_bias == ((3, 2.5), (7, -1.0))
    assert SamplingParams(logit_bias=[(1, 100), (0, -100)]).logit_bias == ((0, -100.0), (1, 100.0))
    assert SamplingParams().logit_bias == ()


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: -101}, {1: float("nan")}, {1: float("inf")}, {-1: 1.0},
                                  {True: 1.0}, {"1": 1.0}, {1: True}, "1", [(1, 2, 3)]])
def test_params_reject_bad_entries_naming_logit_bias(bias):
    with pytest.raises(RequestRejected) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"


def test_bias_moves_greedy_and_sampled_rows_but_not_logprobs_or_other_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    params = [SamplingParams(temperature=0, logit_bias={3: 3.5}, logprobs=1),
              SamplingParams(temperature=0, logprobs=1),
              SamplingParams(temperature=1.0, seed=5, logit_bias={0: -100, 1: -100, 2: -100, 9: 100})]
    out = Sampler(seed=0)(logits.clone(), params, [[], [], []])
    assert out.token_ids == [3, 0, 3]  # the id 9 beyond the vocabulary is ignored
    raw = logits[0].log_softmax(-1)
    assert out.logprobs[0] == pytest.approx(raw[3].item())  # the model's logprob, not the biased one
    assert out.top_logprobs[0] == [(0, pytest.approx(raw[0].item()))]
    assert out.logprobs[1] == pytest.approx(raw[0].item())


# --- HTTP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served():
    with LocalServer(tiny_config()) as server, openai_client(server) as client:
        yield server, client


def _ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def _complete(client, **kwargs):
    extra = {"ignore_eos": True, "return_token_ids": True, **kwargs.pop("extra_body", {})}
    return client.completions.create(model="tiny", prompt="The answer is", extra_body=extra, **GREEDY, **kwargs)


def test_plus_100_forces_a_token_every_step(served):
    _, client = served
    plain = _ids(_complete(client).choices[0])
    forced = next(t for t in range(100, 200) if t not in plain)
    out = _complete(client, logit_bias={str(forced): 100}, logprobs=1)
    choice = out.choices[0]
    assert _ids(choice) == [forced] * 8
    # Reported logprobs are the model's: the forced token is far from certain there.
    assert all(lp < -1.0 for lp in choice.logprobs.token_logprobs)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True, "return_token_ids": True}, **GREEDY)
    assert _ids(chat.choices[0]) == [forced] * 8


def test_minus_100_bans_the_greedy_token(served):
    _, client = served
    plain = _ids(_complete(client).choices[0])
    banned = _ids(_complete(client, logit_bias={str(plain[0]): -100}).choices[0])
    assert banned[0] != plain[0] and plain[0] not in banned
    # A zero bias, or one on a token never in play, changes nothing.
    assert _ids(_complete(client, logit_bias={str(plain[0]): 0}).choices[0]) == plain


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-1": 1}, {" 5": 1}, {"1e3": 1}, {"5": 100.5}, {"5": -101},
                                  {"5": True}, {"5": "1"}, {"99999999": 1}, "5"])
def test_bad_logit_bias_is_400_naming_it(served, bias):
    server, client = served
    assert_rejected(server, "logit_bias", bias)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, logit_bias=bias)


def test_a_key_beyond_the_vocabulary_names_it(served):
    server, _ = served
    vocab = server.context.model.vocab_size
    error = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": "hi", "max_tokens": 1, "logit_bias": {str(vocab): 1}}).json()["error"]
    assert error["param"] == "logit_bias" and "vocabulary" in error["message"] and str(vocab) in error["message"]
    ok = httpx.post(server.url + "/v1/completions", timeout=60,
                    json={"prompt": "hi", "max_tokens": 1, "logit_bias": {str(vocab - 1): 1}})
    assert ok.status_code == 200
