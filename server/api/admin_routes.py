"""The admin API (on only when an admin key is set): patterns, calibration jobs, the variant cache."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from pattern_store.recipes import DEFAULT_MOE_METHOD
from server.api.openai_routes import bearer_token, service_of
from server.api.schemas import CalibrationPrompt, RegisterPatternRequest
from server.errors import APIError
from server.patterns import CalibrationText, PatternRecipe

MAX_BUNDLE_BYTES = 256 * 2**20


async def require_admin_key(request: Request) -> None:
    token = bearer_token(request)
    if token is None:
        raise APIError(401, "the admin API needs 'Authorization: Bearer <admin key>'", code="invalid_api_key")
    if not secrets.compare_digest(token.encode(), request.app.state.config.admin_key.encode()):
        raise APIError(403, "this key is not the admin key", code="forbidden")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)])


# -- patterns ---------------------------------------------------------------------------------------


@router.get("/patterns")
async def list_patterns(request: Request) -> dict[str, Any]:
    service = service_of(request)
    data = []
    for name in service.store.names():
        summary = service.pattern_summary(name)
        summary["examples"] = len(summary.get("examples", []))
        data.append(summary)
    return {"object": "list", "data": data}


@router.get("/patterns/{name}")
async def show_pattern(name: str, request: Request) -> dict[str, Any]:
    return service_of(request).pattern_summary(name)


@router.post("/patterns", status_code=202)
async def register_pattern(body: RegisterPatternRequest, request: Request) -> dict[str, Any]:
    """Calibrate a pattern from the prompts in the body; poll the returned job."""
    service = service_of(request)
    moe = service.builder.family.kind == "moe"
    method = body.method or (DEFAULT_MOE_METHOD if moe else "seap")
    texts = [
        CalibrationText(p.prompt, p.response) if isinstance(p, CalibrationPrompt) else CalibrationText(p, None)
        for p in body.prompts
    ]
    if any(not text.prompt.strip() for text in texts):
        raise APIError(400, "calibration prompts must not be empty", param="prompts")
    examples = body.examples or [text.prompt for text in texts]
    recipe = PatternRecipe(
        method=method,
        keep_ratio=None if body.keep_experts else (body.keep if body.keep is not None else 0.5),
        keep_experts=body.keep_experts,
        threshold=body.threshold,
        sparsity=body.sparsity,
        budget=body.budget,
        refine=body.refine,
    )
    if not moe and (body.refine != "none" or body.budget != "uniform"):
        param = "refine" if body.refine != "none" else "budget"
        raise APIError(400, f"{param} chooses experts; a dense model's pattern has none", param=param)
    try:
        recipe.validate(moe)
    except ValueError as error:
        raise APIError(400, str(error), param="method") from None
    job = await run_in_threadpool(service.register, body.name, texts, examples, recipe, body.replace)
    return job.to_json()


@router.post("/patterns/import", status_code=201)
async def import_pattern(request: Request, replace: bool = False) -> dict[str, Any]:
    """Add a pattern bundle (`taskmoe patterns export`) sent as the raw request body."""
    service = service_of(request)
    data = bytearray()
    async for part in request.stream():
        data.extend(part)
        if len(data) > MAX_BUNDLE_BYTES:
            raise APIError(413, f"a pattern bundle is at most {MAX_BUNDLE_BYTES} bytes")
    if not data:
        raise APIError(400, "send the pattern bundle as the request body")
    return await run_in_threadpool(service.import_bundle, bytes(data), replace)


@router.delete("/patterns/{name}")
async def delete_pattern(name: str, request: Request) -> dict[str, Any]:
    await run_in_threadpool(service_of(request).delete, name)
    return {"id": name, "object": "pattern", "deleted": True}


# -- jobs -------------------------------------------------------------------------------------------


@router.get("/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [job.to_json() for job in service_of(request).jobs.list()]}


@router.get("/jobs/{job_id}")
async def show_job(job_id: str, request: Request) -> dict[str, Any]:
    job = service_of(request).jobs.get(job_id)
    if job is None:
        raise APIError(404, f"no job {job_id!r}", code="job_not_found")
    return job.to_json()


# -- the variant cache ------------------------------------------------------------------------------


@router.get("/cache")
async def list_cache(request: Request) -> dict[str, Any]:
    return service_of(request).cache_report()


@router.post("/cache/{name}")
async def warm(name: str, request: Request) -> dict[str, Any]:
    """Build (or touch) the variant of pattern `name` ('full': the full model)."""
    return await run_in_threadpool(service_of(request).warm, name)


@router.delete("/cache/{name}")
async def evict(name: str, request: Request) -> dict[str, Any]:
    dropped = service_of(request).evict(name)
    if dropped is None:
        raise APIError(404, f"no cached variant for {name!r}", code="not_cached")
    return {"pattern": name, "evicted": dropped}
