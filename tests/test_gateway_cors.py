"""CORS: off unless configured; with allowed origins, browsers' preflights are answered (without an API
key) and answers carry the headers that let the page read them, errors included. The openai client
(with the Origin header a browser would send) and raw HTTP against local servers."""
from __future__ import annotations

import httpx
import openai
import pytest

from services.config_checks import ConfigError
from services.gateway.auth import ApiKeys
from services.gateway.config import CorsConfig, load_config
from tests.test_gateway_support import LocalServer, openai_client, tiny_config

pytestmark = pytest.mark.timeout(180)

PAGE = "http://playground.test:3000"
OTHER = "https://elsewhere.test"
KEY = "sk-cors-test"


def preflight(url: str, origin: str, method: str = "POST",
              headers: str = "authorization, content-type, x-stainless-os") -> httpx.Response:
    return httpx.options(url, timeout=60, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                                    "Access-Control-Request-Headers": headers})


@pytest.fixture(scope="module")
def cors_server():
    config = tiny_config(cors=CorsConfig(allowed_origins=(PAGE,), max_age_s=120))
    with LocalServer(config, keys=ApiKeys([KEY])) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server():
    with LocalServer(tiny_config()) as server:
        yield server


def test_preflight_from_an_allowed_origin_needs_no_key(cors_server):
    answer = preflight(cors_server.url + "/v1/chat/completions", PAGE)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == PAGE
    assert {"GET", "POST"} <= {m.strip() for m in answer.headers["access-control-allow-methods"].split(",")}
    allowed = {h.strip().lower() for h in answer.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed
    assert answer.headers["access-control-max-age"] == "120"
    assert "access-control-allow-credentials" not in answer.headers


def test_answers_to_an_allowed_origin_are_readable(cors_server):
    with openai.OpenAI(base_url=cors_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60,
                       default_headers={"Origin": PAGE}) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert raw.parse().usage.completion_tokens >= 1
        assert raw.headers["access-control-allow-origin"] == PAGE
        exposed = {h.strip().lower() for h in raw.headers["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "retry-after"} <= exposed
        models = client.models.with_raw_response.list()
        assert models.headers["access-control-allow-origin"] == PAGE
    # An error answer carries them too, so the page can show it.
    unauthorized = httpx.post(cors_server.url + "/v1/completions", json={"prompt": "a"}, headers={"Origin": PAGE})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == PAGE


def test_other_origins_are_refused(cors_server):
    answer = preflight(cors_server.url + "/v1/chat/completions", OTHER)
    assert answer.status_code == 400 and "access-control-allow-origin" not in answer.headers
    assert preflight(cors_server.url + "/v1/models", PAGE, method="DELETE").status_code == 400
    # A request sent anyway is served (CORS is the browser's rule) without the headers it would need.
    served = httpx.get(cors_server.url + "/v1/models", headers={"Origin": OTHER, "Authorization": f"Bearer {KEY}"})
    assert served.status_code == 200 and "access-control-allow-origin" not in served.headers


def test_off_by_default(plain_server):
    answer = preflight(plain_server.url + "/v1/chat/completions", PAGE)
    assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers
    with openai_client(plain_server) as client:
        raw = client.with_options(default_headers={"Origin": PAGE}).models.with_raw_response.list()
    assert raw.parse().data[0].id == "tiny"
    assert not any(name.startswith("access-control-") for name in raw.headers)


def test_configuration():
    assert not CorsConfig().enabled
    config = load_config(None, {"cors.allowed_origins": "http://a.test, https://b.test:8443"})
    assert config.cors.allowed_origins == ("http://a.test", "https://b.test:8443") and config.cors.enabled
    assert load_config(None, {"cors": {"allowed_origins": ["*"], "allowed_methods": ["*"]}}).cors.enabled
    for bad, words in [({"allowed_origins": ("http://a.test/",)}, "no trailing"),
                       ({"allowed_origins": ("a.test",)}, "not an origin"),
                       ({"allowed_origins": ("http://a.test/path",)}, "not an origin"),
                       ({"allowed_origins": ("",)}, "non-empty"),
                       ({"allowed_methods": ("PO ST",)}, "method or header"),
                       ({"allowed_headers": ("x:y",)}, "method or header"),
                       ({"allowed_origins": ("*",), "allow_credentials": True}, "wildcard"),
                       ({"allow_credentials": "yes"}, "true or false"),
                       ({"max_age_s": -1}, "max_age_s")]:
        with pytest.raises(ConfigError, match=words):
            CorsConfig(**bad)
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(None, {"cors": {"origins": ["http://a.test"]}})
