"""The admin API (on only when an admin key is set): patterns, calibration jobs, what is resident."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from pattern_store.recipes import suggestion_refinement
from pattern_store.suggest import MIN_SIZE
from server.api.auth import require_admin_key, runtime_of
from server.api.schemas import CalibrateSuggestionRequest, CalibrationPrompt, RegisterPatternRequest
from server.errors import APIError, InvalidRequest, shown
from server.patterns import CalibrationText, PatternRecipe, RecipeError

MAX_BUNDLE_BYTES = 256 * 2**20

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)])


# -- patterns ---------------------------------------------------------------------------------------


@router.get("/patterns")
async def list_patterns(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": runtime_of(request).patterns.summaries()}


@router.get("/patterns/{name}")
async def show_pattern(name: str, request: Request) -> dict[str, Any]:
    return runtime_of(request).patterns.summary(name)


@router.post("/patterns", status_code=202)
async def register_pattern(body: RegisterPatternRequest, request: Request) -> dict[str, Any]:
    """Calibrate a pattern from the prompts in the body; poll the returned job."""
    runtime = runtime_of(request)
    texts = [
        CalibrationText(p.prompt, p.response) if isinstance(p, CalibrationPrompt) else CalibrationText(p, None)
        for p in body.prompts
    ]
    if any(not text.prompt.strip() for text in texts):
        raise APIError(400, "calibration prompts must not be empty", param="prompts")
    try:
        recipe = PatternRecipe.for_model(
            runtime.info.kind == "moe",
            method=body.method,
            keep=body.keep,
            keep_experts=body.keep_experts,
            threshold=body.threshold,
            sparsity=body.sparsity,
            budget=body.budget,
            refine=body.refine,
            target=body.target,
            substitute=body.substitute,
            rank=body.substitute_rank,
        )
    except RecipeError as error:
        raise InvalidRequest(str(error), param=error.param) from None
    examples = body.examples or [text.prompt for text in texts]
    job = await run_in_threadpool(runtime.patterns.create, body.name, texts, examples, recipe, body.replace)
    return job.to_json()


@router.post("/patterns/import", status_code=201)
async def import_pattern(request: Request, replace: bool = False) -> dict[str, Any]:
    """Add a pattern file (`taskmoe pattern-file export`) sent as the raw request body."""
    runtime = runtime_of(request)
    data = bytearray()
    async for part in request.stream():
        data.extend(part)
        if len(data) > MAX_BUNDLE_BYTES:
            raise APIError(413, f"a pattern bundle is at most {MAX_BUNDLE_BYTES} bytes")
    if not data:
        raise APIError(400, "send the pattern bundle as the request body")
    return await run_in_threadpool(runtime.patterns.import_bundle, bytes(data), replace)


@router.delete("/patterns/{name}")
async def delete_pattern(name: str, request: Request) -> dict[str, Any]:
    await run_in_threadpool(runtime_of(request).patterns.delete, name)
    return {"id": name, "object": "pattern", "deleted": True}


# -- the store --------------------------------------------------------------------------------------


@router.get("/store")
async def show_store(request: Request) -> dict[str, Any]:
    """The store as the server last read it: patterns, damaged or unreadable files, routing's revision."""
    return runtime_of(request).store_report()


# -- traffic no pattern covers ----------------------------------------------------------------------


@router.get("/fallback-record")
async def show_fallback_record(request: Request) -> dict[str, Any]:
    """How many fallback queries are recorded, why they fell back, and whether their text is kept."""
    return {"object": "fallback_record", **runtime_of(request).recorded().summary()}


@router.delete("/fallback-record")
async def clear_fallback_record(request: Request) -> dict[str, Any]:
    """Forget every recorded query (the file in the store directory too)."""
    cleared = await run_in_threadpool(runtime_of(request).recorded().clear)
    return {"object": "fallback_record", "cleared": cleared}


@router.post("/suggestions/{cluster}/calibrate", status_code=202)
async def calibrate_suggestion(cluster: int, body: CalibrateSuggestionRequest, request: Request) -> dict[str, Any]:
    """Calibrate suggestion `cluster` into a pattern: the full model answers its recorded prompts, then
    the usual recipe, refined by answer loss on a MoE model (`refine`); poll the returned job. The store's
    routing picks the pattern up when the job ends."""
    runtime = runtime_of(request)
    queries, suggestions = await run_in_threadpool(runtime.suggestions, body.min_size)
    chosen = next((s for s in suggestions if s.cluster == cluster), None)
    if chosen is None:
        raise APIError(404, f"no suggestion {cluster}: there are {len(suggestions)}", code="suggestion_not_found")
    prompts = chosen.prompts(queries)
    if not prompts:
        raise APIError(
            409, "the record keeps no text to calibrate on: start the server with --record-text", code="no_text"
        )
    try:
        moe = runtime.info.kind == "moe"
        recipe = PatternRecipe.for_model(moe, refine=body.refine or suggestion_refinement(moe))
    except RecipeError as error:
        raise InvalidRequest(str(error), param=error.param) from None
    texts = [CalibrationText(prompt, None) for prompt in prompts]
    job = await run_in_threadpool(runtime.patterns.create, body.name, texts, prompts, recipe, body.replace, True)
    return job.to_json()


@router.get("/suggestions")
async def list_suggestions(request: Request, min_size: int = Query(MIN_SIZE, ge=2, le=10_000)) -> dict[str, Any]:
    """Candidate tasks: clusters of the recorded fallback queries, with the nearest stored pattern."""
    _, suggestions = await run_in_threadpool(runtime_of(request).suggestions, min_size)
    return {"object": "list", "data": [suggestion.to_json() for suggestion in suggestions]}


# -- jobs -------------------------------------------------------------------------------------------


@router.get("/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [job.to_json() for job in runtime_of(request).patterns.jobs.list()]}


@router.get("/jobs/{job_id}")
async def show_job(job_id: str, request: Request) -> dict[str, Any]:
    job = runtime_of(request).patterns.jobs.get(job_id)
    if job is None:
        raise APIError(404, f"no job {shown(job_id)}", code="job_not_found")
    return job.to_json()


# -- what is resident -------------------------------------------------------------------------------


@router.get("/cache")
async def list_cache(request: Request) -> dict[str, Any]:
    return runtime_of(request).patterns.cache_report()


@router.post("/cache/{name}")
async def warm(name: str, request: Request) -> dict[str, Any]:
    """Load (or touch) what serves pattern `name` ('full': the full model)."""
    return await run_in_threadpool(runtime_of(request).patterns.warm, name)


@router.delete("/cache/{name}")
async def evict(name: str, request: Request) -> dict[str, Any]:
    dropped = runtime_of(request).patterns.evict(name)
    if dropped is None:
        raise APIError(404, f"no cached variant for {shown(name)}", code="not_cached")
    return {"pattern": name, "evicted": dropped}
