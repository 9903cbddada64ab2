"""API keys and request-size limits, enforced before a request reaches a route.

Keys come from an environment variable (comma-separated) or a file (one per line, '#' comments), both
named in the configuration. A request presents one as `Authorization: Bearer <key>`. Comparison goes
through SHA-256 digests and `hmac.compare_digest` against every key, so neither a key's content nor its
length nor which key matched shows in the response time.

Both checks are plain ASGI middleware: they run for every path (an unknown route without a key is a 401,
not a 404, so routes cannot be probed anonymously) and answer with OpenAI-style error bodies.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.gateway.config import AuthConfig
from services.gateway.errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    PayloadTooLargeError,
    error_response,
)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys (as digests). Empty: authentication is off."""

    def __init__(self, keys: Iterable[str] = ()):
        cleaned = {k.strip() for k in keys if k and k.strip()}
        self._digests = tuple(_digest(k) for k in sorted(cleaned))
        self._keys = frozenset(cleaned)

    @classmethod
    def from_config(cls, config: AuthConfig, environ: Mapping[str, str] | None = None) -> ApiKeys:
        """Read the configured sources. A configured source that yields no key is an error: it would
        otherwise turn authentication off without anyone noticing."""
        environ = os.environ if environ is None else environ
        keys: list[str] = []
        if config.api_key_env is not None:
            value = environ.get(config.api_key_env)
            if value is None:
                raise ValueError(f"API keys: environment variable {config.api_key_env} is not set")
            keys += value.split(",")
        if config.api_key_file is not None:
            path = Path(config.api_key_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise ValueError(f"API keys: file not found: {path}") from None
            keys += [line.split("#", 1)[0] for line in lines]
        result = cls(keys)
        if config.enabled and not result.enabled:
            raise ValueError("API keys: the configured source holds no key")
        return result

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def keys(self) -> frozenset[str]:
        """The keys themselves, for another front end (gRPC) that checks them on its own."""
        return self._keys

    def check(self, token: str) -> bool:
        digest = _digest(token)
        # Every key is compared, also after a match: the time does not tell which key it was.
        matches = [hmac.compare_digest(digest, d) for d in self._digests]
        return any(matches)

    def authorized(self, authorization: str | None) -> bool:
        if not self.enabled:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and bool(token.strip()) and self.check(token.strip())


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ApiKeyMiddleware:
    def __init__(self, app, keys: ApiKeys, open_paths: frozenset[str]):
        self.app, self.keys, self.open_paths = app, keys, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys.enabled or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        if self.keys.authorized(_header(scope, b"authorization")):
            return await self.app(scope, receive, send)
        error = AuthenticationError("missing or invalid API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error_response(error)(scope, receive, send)


# Bodies are JSON. No Content-Type, and curl's default form type, are read as JSON too (clients omit
# or misstate it often); anything else cannot be what the client meant.
_JSON_TYPES = ("application/json", "application/x-www-form-urlencoded")


def _media_type(value: str | None) -> str | None:
    return None if value is None else value.split(";", 1)[0].strip().lower() or None


def _status_error(status: int, message: str, code: str) -> ApiError:
    error = BadRequestError(message, code=code)
    error.status = status
    return error


class BodyLimitMiddleware:
    """Reads the body up to `max_bytes` (413 beyond, before any parsing), each piece within
    `read_timeout_s` (408 after), and checks that it is declared as JSON (415) and is UTF-8; the app
    then sees the buffered body as usual."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 30.0):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        error = None
        declared = _header(scope, b"content-length")
        media = _media_type(_header(scope, b"content-type"))
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            error = self._too_large()
        elif media is not None and media not in _JSON_TYPES and not media.endswith("+json"):
            error = _status_error(415, f"the request body must be JSON (Content-Type: application/json), "
                                       f"got Content-Type {media}", "unsupported_media_type")
        body = bytearray()
        more = error is None
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                error = _status_error(408, f"the request body did not arrive within {self.read_timeout_s:g} s "
                                           f"of its previous part", "body_timeout")
                error.headers["Connection"] = "close"
                break
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                error = self._too_large()
                break
        if error is None:
            try:
                bytes(body).decode("utf-8")
            except UnicodeDecodeError as exc:
                error = BadRequestError(f"the request body is not valid UTF-8 (byte {exc.start})",
                                        code="invalid_encoding")
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return PayloadTooLargeError(f"the request body is larger than the limit of {self.max_bytes} bytes",
                                    code="body_too_large")
