"""API keys: sources, matching, and the middleware's answers (without an engine)."""
from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.gateway.auth import ApiKeyMiddleware, ApiKeys, BodyLimitMiddleware
from services.gateway.config import AuthConfig


def test_keys_from_an_environment_variable_and_a_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nfile-key-1\n\n  file-key-2  # rotated in May\n")
    keys = ApiKeys.from_config(AuthConfig(api_key_env="KEYS", api_key_file=str(path)),
                               environ={"KEYS": "env-a, env-b,"})
    assert keys.keys == {"env-a", "env-b", "file-key-1", "file-key-2"}
    for good in ("Bearer env-a", "bearer file-key-2", "Bearer  env-b "):
        assert keys.authorized(good)
    for bad in (None, "", "Bearer", "Bearer ", "env-a", "Basic env-a", "Bearer env-a2", "Bearer ENV-A"):
        assert not keys.authorized(bad)


def test_no_source_means_no_authentication_but_an_empty_source_is_an_error(tmp_path):
    assert ApiKeys.from_config(AuthConfig(), environ={}).authorized(None)
    with pytest.raises(ValueError, match="not set"):
        ApiKeys.from_config(AuthConfig(api_key_env="MISSING"), environ={})
    with pytest.raises(ValueError, match="no key"):
        ApiKeys.from_config(AuthConfig(api_key_env="EMPTY"), environ={"EMPTY": " , "})
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="no key"):
        ApiKeys.from_config(AuthConfig(api_key_file=str(empty)), environ={})
    with pytest.raises(ValueError, match="not found"):
        ApiKeys.from_config(AuthConfig(api_key_file=str(tmp_path / "nope")), environ={})


def _app(keys: ApiKeys) -> TestClient:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict):
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    wrapped = BodyLimitMiddleware(ApiKeyMiddleware(app, keys, frozenset({"/health"})), max_bytes=64)
    return TestClient(wrapped)


def test_middleware_answers():
    client = _app(ApiKeys(["k"]))
    assert client.get("/health").status_code == 200
    denied = client.post("/echo", json={"a": 1})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    ok = client.post("/echo", json={"a": 1}, headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200 and ok.json() == {"a": 1}
    big = client.post("/echo", json={"a": "x" * 100}, headers={"Authorization": "Bearer k"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    open_client = _app(ApiKeys())
    assert open_client.post("/echo", json={"b": 2}).json() == {"b": 2}
