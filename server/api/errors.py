"""Every error leaves the server as an OpenAI error body with the right status: bad JSON and bad values
are 400 (not FastAPI's 422), unknown routes 404, and an unexpected failure is a 500 that names the
request id for the logs, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import (
    APIError,
    ContextTooLong,
    InvalidPattern,
    InvalidRequest,
    JobInProgress,
    LoadFailed,
    ModelNotFound,
    NoRoom,
    PatternDamaged,
    PatternExists,
    PatternInUse,
    PatternNotFound,
    PatternUnusable,
    RecordingOff,
    ServiceError,
    TooManyJobs,
)

log = logging.getLogger("taskmoe.api")


#: every domain error's HTTP status and OpenAI error code (the most specific class that matches wins)
SERVICE_ERRORS: dict[type[ServiceError], tuple[int, str | None]] = {
    ContextTooLong: (400, "context_length_exceeded"),
    InvalidPattern: (400, "invalid_pattern"),
    InvalidRequest: (400, None),
    ModelNotFound: (404, "model_not_found"),
    PatternNotFound: (404, "pattern_not_found"),
    PatternDamaged: (503, "pattern_damaged"),
    PatternExists: (409, "pattern_exists"),
    PatternInUse: (409, "pattern_in_use"),
    PatternUnusable: (409, "pattern_unusable"),
    JobInProgress: (409, "job_in_progress"),
    RecordingOff: (409, "recording_off"),
    TooManyJobs: (429, "too_many_jobs"),
    NoRoom: (503, "cache_full"),
    LoadFailed: (500, "variant_build_failed"),
}


def api_error(error: ServiceError) -> APIError:
    """The HTTP rendering of a domain error."""
    status, code = next(SERVICE_ERRORS[kind] for kind in type(error).__mro__ if kind in SERVICE_ERRORS)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return APIError(status, error.message, code=code, param=error.param, headers=headers)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(location) or None
    if param is None:
        return "the request body must be a JSON object (with Content-Type: application/json)", None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = f"missing required parameter {param!r}"
    elif param:
        message = f"invalid value for {param!r}: {message}"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def http_error_body(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(api_error(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(error.status_code, message, headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "?")
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error (request id {request_id})", code="internal_error"))


ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}


def install_openapi(app: FastAPI) -> None:
    """The schema says what the server does: bad requests are 400 with an OpenAI error body (FastAPI would
    document its own 422 validation error, which this server never sends)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = document.setdefault("components", {}).setdefault("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            components["ErrorResponse"] = ERROR_SCHEMA
            error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    if responses.pop("422", None) is not None:
                        responses["400"] = {
                            "description": "Invalid request (an OpenAI error body)",
                            "content": error_body,
                        }
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]
