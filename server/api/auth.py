"""Who may call what: the API key on `/v1`, the admin key on `/admin`, either on a private `/metrics`; and the
runtime a route works on (503 while the model loads)."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import APIError
from server.runtime import Runtime


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, key: str) -> bool:
    return secrets.compare_digest(token.encode(), key.encode())


async def require_api_key(request: Request) -> None:
    expected = request.app.state.config.api_key
    if not expected:
        return
    token = bearer_token(request)
    if token is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not _matches(token, expected):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


async def require_admin_key(request: Request) -> None:
    token = bearer_token(request)
    if token is None:
        raise APIError(401, "the admin API needs 'Authorization: Bearer <admin key>'", code="invalid_api_key")
    if not _matches(token, request.app.state.config.admin_key):
        raise APIError(403, "this key is not the admin key", code="forbidden")


def require_metrics_key(request: Request) -> None:
    """`--metrics-public false`: /metrics only for the API or admin key (its labels name the patterns)."""
    config = request.app.state.config
    if config.metrics_public:
        return
    token = bearer_token(request)
    keys = [key for key in (config.api_key, config.admin_key) if key]
    if token is None or not any(_matches(token, key) for key in keys):
        raise APIError(401, "/metrics needs 'Authorization: Bearer <API or admin key>'", code="invalid_api_key")


def runtime_of(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        failure = getattr(request.app.state, "load_error", None)
        message = f"the model failed to load: {failure}" if failure else "the model is still loading; retry shortly"
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
    return runtime
