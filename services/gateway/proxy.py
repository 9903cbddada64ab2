"""What runs inside Ray Serve's HTTP proxy, before the request reaches the gateway replica.

Ray's proxy reads `X-Request-Id` itself: it decodes the header as UTF-8 (a header that is not answers
500, before any of the gateway's checks), and it echoes the client's value whatever it is. The
middleware here runs ahead of Ray's own (Serve applies `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`'s
middlewares outside its request-id middleware), so the proxy and the gateway only ever see an id that
`sanitized_request_id` accepted or made, and the header returned and the body's `id` agree.

The callback also gives the proxy's server a header-read timeout (header_timeout.py), of
`GROK_SERVE_HEADER_READ_TIMEOUT_S` seconds from the proxy's environment (default 30; the configuration's
`header_read_timeout_s`, which `grok-serve up` exports): the environment is the only way into that
process.

Serve reads the callback's path from the environment of the proxy's process, so it has to be set where
Ray starts (`grok-serve up` does; for `serve run` and KubeRay, set it on the head node:
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=services.gateway.proxy:proxy_middlewares`).
"""
from __future__ import annotations

import os
import re
import uuid

from starlette.middleware import Middleware

from services.gateway import header_timeout

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "services.gateway.proxy:proxy_middlewares"
HEADER_TIMEOUT_ENV = "GROK_SERVE_HEADER_READ_TIMEOUT_S"
DEFAULT_HEADER_TIMEOUT_S = 30.0

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_HEADER = b"x-request-id"


def sanitized_request_id(given: bytes | None) -> str:
    """The client's X-Request-Id when it is a sane token (as bytes: it may not even be UTF-8), else a
    new one."""
    return given.decode("ascii") if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestIdSanitizer:
    """Replaces an X-Request-Id outside `[A-Za-z0-9._:-]{1,128}` (or several of them) with a new id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            given = [v for k, v in headers if k.lower() == _HEADER]
            if given:
                kept = sanitized_request_id(given[0] if len(given) == 1 else None)
                if len(given) > 1 or kept.encode() != given[0]:
                    scope = {**scope, "headers": [*((k, v) for k, v in headers if k.lower() != _HEADER),
                                                  (_HEADER, kept.encode())]}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback, called in the proxy's process before its server starts."""
    header_timeout.install(float(os.environ.get(HEADER_TIMEOUT_ENV) or DEFAULT_HEADER_TIMEOUT_S))
    return [Middleware(RequestIdSanitizer)]
