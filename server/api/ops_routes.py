"""Liveness, readiness and Prometheus metrics: open to the cluster, no API key (metrics: unless
`--metrics-public false`)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.openai_routes import bearer_token
from server.errors import APIError
from server.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Alive: the process answers. A model that failed to load makes it unhealthy, so an orchestrator
    restarts it rather than leaving it unready for ever."""
    failure = getattr(request.app.state, "load_error", None)
    if failure:
        return JSONResponse({"status": "failed", "error": failure}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready: the model and the pattern store are loaded, so requests will be served."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model": service.model_name, "patterns": len(service.store.names())})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics; with `--metrics-public false` only for the API or admin key (they name patterns)."""
    config = request.app.state.config
    if not config.metrics_public:
        token = bearer_token(request)
        keys = [key for key in (config.api_key, config.admin_key) if key]
        if token is None or not any(secrets.compare_digest(token.encode(), key.encode()) for key in keys):
            raise APIError(401, "/metrics needs 'Authorization: Bearer <API or admin key>'", code="invalid_api_key")
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
