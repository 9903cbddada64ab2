"""Every rejection as an OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.

`ApiError` carries the HTTP status and body fields. `api_error` is the one translation of the engine
contract's failures (services/engine/api.py) to HTTP, by their type; the handlers installed by
`install_error_handlers` turn `ApiError`, FastAPI's validation errors, Starlette's HTTP errors (404
route, 405) and anything unexpected into that shape, so a client library always finds a message and
the server keeps serving.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.engine.api import EngineDeadError, QueueFullError, RequestRejected

logger = logging.getLogger(__name__)


class ApiError(Exception):
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequestError(ApiError):
    status, type = 400, "invalid_request_error"


class AuthenticationError(ApiError):
    status, type = 401, "authentication_error"


class NotFoundError(ApiError):
    status, type = 404, "not_found_error"


class PayloadTooLargeError(ApiError):
    status, type = 413, "invalid_request_error"


class RateLimitError(ApiError):
    status, type = 429, "rate_limit_error"


class ServiceUnavailableError(ApiError):
    status, type = 503, "service_unavailable_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={**error.headers, **(headers or {})})


def api_error(exc: BaseException, retry_after_s: int, rename: Mapping[str, str] | None = None) -> ApiError:
    """The HTTP error for a failure on the way to the engine; `rename` maps the engine's parameter
    names to the request's (chat's `top_logprobs` is the engine's `logprobs`)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestRejected):
        param = exc.param if exc.param is None or rename is None else rename.get(exc.param, exc.param)
        return BadRequestError(str(exc), param=param, code=exc.code)
    if isinstance(exc, ValueError):
        return BadRequestError(str(exc))
    if isinstance(exc, QueueFullError):
        retry = exc.retry_after_s if exc.retry_after_s is not None else retry_after_s
        return RateLimitError(f"{exc}; retry later", code="queue_full",
                              headers={"Retry-After": str(max(1, round(retry)))})
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError(f"the engine is not available: {exc}", code="engine_unavailable",
                                       headers={"Retry-After": str(retry_after_s)})
    logger.error("engine call failed", exc_info=exc)
    error = ApiError("internal error while generating", code="internal_error")
    error.status, error.type = 500, "server_error"
    return error


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    # Union members appear in the location ("prompt", "list[int]", 0): name the field the client wrote.
    param = loc[0] if loc else None
    if param is None or param.isdigit():
        param = None
    where = ".".join(p for p in loc if "[" not in p) or "body"
    return f"{where}: {first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(BadRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            error: ApiError = NotFoundError(f"no route {request.method} {request.url.path}",
                                            code="route_not_found")
        elif status == 405:
            error = BadRequestError(f"method {request.method} is not allowed on {request.url.path}",
                                    code="method_not_allowed")
            error.status = 405
        else:
            error = BadRequestError(str(exc.detail))
            error.status = status
            if status >= 500:
                error.type = "server_error"
        return error_response(error, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        error = ApiError("internal server error", code="internal_error")
        error.status, error.type = 500, "server_error"
        return error_response(error)

