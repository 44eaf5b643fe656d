"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and the
handlers that turn every failure into one, so clients always get a parseable answer."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.async_engine import EngineDeadError, EngineOverloaded, RequestFailed, ShuttingDown
from scheduler.scheduler import RequestRejected
from scheduler.structured import InvalidGrammar
from server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict"})


class APIError(Exception):
    """An error a route reports to its client (never a bug: those become logged 500s)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        detail = ErrorDetail(
            message=self.message,
            type=_TYPES.get(self.status, "server_error"),
            param=self.param,
            code=self.code,
        )
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def from_engine(error: Exception) -> APIError:
    """Map one of the engine's typed refusals (``ENGINE_ERRORS``) to HTTP."""
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(error, RequestRejected):
        return bad_request(str(error), param="prompt")
    if isinstance(error, InvalidGrammar):
        return bad_request(str(error), param=error.field)
    if isinstance(error, EngineOverloaded):
        return APIError(429, str(error), code="queue_full", headers=retry)
    if isinstance(error, RequestFailed):  # its own rows made the step fail: not a retry case
        return APIError(422, str(error), code="request_failed")
    return APIError(503, str(error), code="unavailable", headers=retry)  # shutting down, dead


ENGINE_ERRORS = (
    RequestRejected,
    InvalidGrammar,
    EngineOverloaded,
    RequestFailed,
    ShuttingDown,
    EngineDeadError,
)


def _validation_param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``; pydantic's union branch
    names (``str``, ``list[int]``, ``constrained-str``) are dropped."""
    parts = [
        str(p)
        for p in loc[1:]
        if isinstance(p, int) or (p.isidentifier() and p not in _BRANCH_NAMES)
    ]
    return ".".join(parts) or None


async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _on_validation(_: Request, exc: Exception) -> JSONResponse:
    """Pydantic validation -> 400 like OpenAI, naming the first offending field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # a JSON syntax error's loc holds a character offset, not a field
    is_json = first.get("type") == "json_invalid"
    param = None if is_json else _validation_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid request")
    if is_json:
        msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
    message = f"{param}: {msg}" if param else msg
    return bad_request(message, param).response()


async def _on_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return APIError(status, message, headers=exc.headers).response()


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "internal server error", code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_bug)
