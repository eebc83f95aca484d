"""Every error the HTTP front answers, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Route code raises ``ApiError`` (or lets a ``UserError`` from the control plane
through); the handlers installed by ``install_error_handlers`` turn those,
FastAPI's request validation errors and anything unexpected into that shape
with the right status, so an OpenAI client sees the errors it knows how to read.
A spec refusal names the request parameter it is about (``size``, ``seconds``,
``seed``...), the way OpenAI's ``param`` does.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.core.errors import UserError
from scheduler.core.object_store import ObjectStoreError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
# Spec fields that are spelled differently in OpenAI's request.
_SPEC_TO_PARAM = {"width": "size", "height": "size", "frames": "seconds", "image": "input_reference"}
_SPEC_FIELD = re.compile(r"^invalid job spec: ([A-Za-z_][A-Za-z0-9_]*)")


class ApiError(Exception):
    """An answer other than success: HTTP status, one-line message, OpenAI error type, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = INVALID_REQUEST,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def not_found(what: str, ident: str, hint: str) -> ApiError:
    return ApiError(404, f"{what} {ident!r} not found; {hint}", code="not_found")


def from_user_error(exc: UserError) -> ApiError:
    """A control-plane refusal as an API error: 404 for what does not exist, 400 naming the param otherwise."""
    message = str(exc).strip("'\"")
    if isinstance(exc, LookupError):
        return ApiError(404, message, code="not_found")
    if isinstance(exc, ObjectStoreError):
        return ApiError(503, message, error_type="server_error", code="object_store_unavailable")
    match = _SPEC_FIELD.match(message)
    param = _SPEC_TO_PARAM.get(match.group(1), match.group(1)) if match else None
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    # loc is ("body"|"query"|"path"|"header", name, ...): the name is the param OpenAI clients expect.
    where = [str(part) for part in first.get("loc", ())[1:]]
    param = ".".join(where) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return ApiError(400, f"{param or 'request'}: {message}", param=param, code="invalid_value")


def _respond(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _respond(exc)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return _respond(from_user_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; see /openapi.json for the routes this server has"
        return _respond(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        message = f"the server failed answering {request.method} {request.url.path} ({type(exc).__name__}); see its log"
        return _respond(ApiError(500, message, error_type="server_error"))
