"""Liveness, readiness and Prometheus metrics: open to the cluster, no API key (metrics: unless
`--metrics-public false`)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.auth import require_metrics_key
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
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model": runtime.info.name, "patterns": len(runtime.store.names())})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics; with `--metrics-public false` only for the API or admin key (they name patterns)."""
    require_metrics_key(request)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
