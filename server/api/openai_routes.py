"""The OpenAI-compatible routes: models, chat and text completions (streamed or not), and `/v1/route`.
Each parses its body, calls one entry point of the runtime, and renders what comes back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from server.api.auth import require_api_key, runtime_of
from server.api.render import respond
from server.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest, RouteRequest
from server.errors import APIError, shown
from server.resolver import Choice

router = APIRouter(dependencies=[Depends(require_api_key)])


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "taskmoe"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    created = int(request.app.state.started)
    return {"object": "list", "data": [_model_card(i, created) for i in runtime_of(request).resolver.model_ids()]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    if model_id not in runtime_of(request).resolver.model_ids():
        raise APIError(404, f"model {shown(model_id)} does not exist", code="model_not_found", param="model")
    return _model_card(model_id, int(request.app.state.started))


@router.post("/v1/route")
async def route(body: RouteRequest, request: Request) -> dict[str, Any]:
    """Which pattern would serve this request, without generating."""
    runtime = runtime_of(request)
    choice = await run_in_threadpool(
        runtime.resolver.explain, body.model or runtime.info.name, body.pattern, body.query()
    )
    return route_body(choice, runtime.info.name)


def route_body(choice: Choice, model_name: str) -> dict[str, Any]:
    decision = choice.decision
    return {
        "object": "route",
        "pattern": choice.label,
        "patterns": list(choice.patterns),
        "model": choice.served_id(model_name),
        "reason": choice.how,
        "probability": None if choice.probability is None else round(choice.probability, 4),
        "typicality": None if decision is None or decision.typicality is None else round(decision.typicality, 4),
        "candidates": [
            {
                "pattern": c.pattern,
                "probability": round(c.probability, 4),
                "typicality": round(c.typicality, 4),
                "similarity": None if c.similarity is None else round(c.similarity, 4),
            }
            for c in (decision.candidates if decision else ())
        ],
    }


async def _complete(body: GenerationRequest, request: Request) -> Response:
    runtime = runtime_of(request)
    started = await runtime.completions.start(body.ask(), stream=bool(body.stream))
    return await respond(request, started, request.app.state.proxy, runtime.metrics, body)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _complete(body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _complete(body, request)
