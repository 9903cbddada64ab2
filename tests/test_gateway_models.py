"""`GET /v1/models/{id}` with the openai client: the served model's card, and 404 for any other id."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.test_gateway_support import LocalServer, openai_client, tiny_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def served():
    with LocalServer(tiny_config(served_model_name="org/tiny-chat")) as server, openai_client(server) as client:
        yield server, client


def test_retrieve_the_served_model(served):
    _, client = served
    card = client.models.retrieve("org/tiny-chat")
    assert card.id == "org/tiny-chat" and card.object == "model" and card.owned_by == "grok-serve"
    assert card.model_extra["max_model_len"] == 128 and card.model_extra["root"] == "tiny"
    assert card.model_dump() == client.models.list().data[0].model_dump()


@pytest.mark.parametrize("model_id", ["tiny", "gpt-4o", "org/tiny-chat/extra"])
def test_an_unknown_model_is_404(served, model_id):
    server, client = served
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve(model_id)
    error = info.value.body
    assert error["type"] == "not_found_error" and error["param"] == "model"
    assert error["code"] == "model_not_found" and model_id in error["message"]
    raw = httpx.get(f"{server.url}/v1/models/{model_id}")
    assert raw.status_code == 404 and raw.json()["error"]["code"] == "model_not_found"
