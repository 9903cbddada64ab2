"""The engine contract (services/engine/api.py): one admission rule and structured rejections, the same
on every boundary, without torch."""
from __future__ import annotations

import pickle

import httpx
import pytest

from services.engine.api import (
    CONTEXT_LENGTH_EXCEEDED,
    QueueFullError,
    Rejection,
    RequestRejected,
    admit,
    completion_budget,
)
from services.engine.sampling_params import SamplingParams
from tests.test_gateway_support import LocalServer, tiny_config

LIMITS = {"vocab_size": 100, "max_model_len": 16}


@pytest.mark.parametrize("ids, max_tokens, param, code, words", [
    ([], 4, "prompt", None, "empty"),
    ([1, 100], 4, "prompt", None, "token id 100 is outside the vocabulary [0, 100)"),
    ([1, -1], 4, "prompt", None, "token id -1"),
    ([1] * 16, None, "prompt", CONTEXT_LENGTH_EXCEEDED, "maximum context length is 16"),
    ([1] * 16, 1, "prompt", CONTEXT_LENGTH_EXCEEDED, "17 tokens"),
    ([1] * 10, 7, "max_tokens", CONTEXT_LENGTH_EXCEEDED, "(10 in the prompt, 7 for the completion)"),
])
def test_admit_rejects_with_param_and_code(ids, max_tokens, param, code, words):
    rejection = admit(ids, max_tokens, **LIMITS)
    assert rejection is not None and words in rejection.message
    assert (rejection.param, rejection.code) == (param, code)


def test_admit_names_the_prompt_field_it_is_given():
    assert admit([], 1, param="messages", **LIMITS).param == "messages"
    assert admit([1] * 20, 1, param="messages", **LIMITS).param == "messages"


def test_admit_accepts_what_fits():
    assert admit([1] * 10, 6, **LIMITS) is None
    assert admit([1] * 15, None, **LIMITS) is None  # room for one token: the engine generates to the end
    assert completion_budget(10, None, 16) == 6 and completion_budget(10, 3, 16) == 3
    assert completion_budget(16, None, 16) == 1


def test_rejections_keep_their_structure_across_processes():
    error = RequestRejected(Rejection("temperature must be ...", "temperature", "bad"))
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, ValueError) and str(again) == "temperature must be ..."
    assert (again.param, again.code) == ("temperature", "bad")
    full = pickle.loads(pickle.dumps(QueueFullError("full", retry_after_s=2.5)))
    assert str(full) == "full" and full.retry_after_s == 2.5


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("n", 0), ("stop", [""]),
                                          ("logprobs", 99), ("seed", True)])
def test_sampling_params_name_the_field_they_reject(field, value):
    with pytest.raises(RequestRejected) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field and str(info.value).startswith(field)


def test_engine_and_package_exports():
    from services.engine import LLM
    from services.engine import SamplingParams as Exported
    from services.engine.config import DTYPES, EXPERT_DTYPES, LOAD_FORMATS
    from services.model.checkpoint import EXPERT_DTYPES as LOADER_EXPERT_DTYPES
    from services.model.checkpoint import LOAD_FORMATS as LOADER_FORMATS
    from services.model.checkpoint import TORCH_DTYPES

    assert Exported is SamplingParams and LLM.__name__ == "LLM"
    # The engine's configuration validates these names without torch; the loader defines them.
    assert set(EXPERT_DTYPES) == set(LOADER_EXPERT_DTYPES)
    assert set(DTYPES) == set(TORCH_DTYPES) and tuple(LOAD_FORMATS) == tuple(LOADER_FORMATS)


@pytest.fixture(scope="module")
def server():
    with LocalServer(tiny_config()) as s:
        yield s


def test_http_names_the_completion_field_the_client_used(server):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for field in ("max_tokens", "max_completion_tokens"):
        response = httpx.post(server.url + "/v1/chat/completions", json={**chat, field: 500})
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == CONTEXT_LENGTH_EXCEEDED
        assert error["param"] == field and "maximum context length is 128" in error["message"]
    detokenize = httpx.post(server.url + "/detokenize", json={"tokens": [1, 10**6]})
    assert detokenize.status_code == 400 and detokenize.json()["error"]["param"] == "tokens"
    assert server.engine.num_requests == 0  # nothing was queued
