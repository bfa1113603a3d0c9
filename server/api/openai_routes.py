"""The OpenAI-compatible routes: models, chat and text completions (streamed or not), and `/v1/route`.

Generation runs on the service's worker threads, never on the event loop. A streamed request's thread
hands its deltas to the response through a queue; when the client goes away the response's
generator is cancelled, sets the generation's cancel flag, and the thread stops at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest, RouteRequest
from server.engine import Delta, Generation, SamplingParams
from server.errors import APIError
from server.request_path import Resolved, sampling_params, served_id
from server.service import Service

log = logging.getLogger("taskmoe.api")


def service_of(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        failure = getattr(request.app.state, "load_error", None)
        message = f"the model failed to load: {failure}" if failure else "the model is still loading; retry shortly"
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
    return service


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request) -> None:
    expected = request.app.state.config.api_key
    if not expected:
        return
    token = bearer_token(request)
    if token is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not secrets.compare_digest(token.encode(), expected.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


router = APIRouter(dependencies=[Depends(require_api_key)])


# -- models -----------------------------------------------------------------------------------------


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "taskmoe"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    service = service_of(request)
    created = int(request.app.state.started)
    return {"object": "list", "data": [_model_card(model_id, created) for model_id in service.model_ids()]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    service = service_of(request)
    if model_id not in service.model_ids():
        raise APIError(404, f"model {model_id!r} does not exist", code="model_not_found", param="model")
    return _model_card(model_id, int(request.app.state.started))


# -- routing ----------------------------------------------------------------------------------------


@router.post("/v1/route")
async def route(body: RouteRequest, request: Request) -> dict[str, Any]:
    """Which pattern would serve this request, without generating."""
    service = service_of(request)
    query = body.query()
    resolved = await run_in_threadpool(service.resolve, body.model or service.model_name, body.pattern, query)
    decision = resolved.decision
    return {
        "object": "route",
        "pattern": resolved.label,
        "patterns": resolved.patterns,
        "model": _served_id(service, resolved),
        "reason": resolved.how,
        "probability": None if resolved.probability is None else round(resolved.probability, 4),
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


# -- generation -------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything a generation request needs, checked before any work starts."""

    kind: str  # "chat" or "text"
    prompts: list[list[int]]
    params: list[SamplingParams]
    resolved: Resolved
    model_id: str
    request_id: str
    created: int
    include_usage: bool

    @property
    def n(self) -> int:
        return self.params[0].n

    @property
    def fingerprint(self) -> str:
        return f"taskmoe-{self.resolved.label}"

    @property
    def headers(self) -> dict[str, str]:
        return {"x-taskmoe-pattern": self.resolved.label, "x-taskmoe-route": self.resolved.route_header}


def _served_id(service: Service, resolved: Resolved) -> str:
    return served_id(service.model_name, resolved.pattern)


async def _plan(
    request: Request,
    body: GenerationRequest,
    kind: str,
    prompts: list[list[int]],
    query: str,
    limit: tuple[int | None, str],
) -> _Plan:
    service = service_of(request)
    body.unsupported()
    params = [sampling_params(body, len(ids), limit, service.context_length, service.config.max_n) for ids in prompts]
    resolved = await run_in_threadpool(service.resolve, body.model, body.pattern, query)
    request.state.pattern, request.state.route_reason = resolved.label, resolved.how
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return _Plan(
        kind=kind,
        prompts=prompts,
        params=params,
        resolved=resolved,
        model_id=_served_id(service, resolved),
        request_id=f"{prefix}-{secrets.token_hex(12)}",
        created=int(time.time()),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    service = service_of(request)
    prompt = await run_in_threadpool(service.chat_prompt_ids, body.conversation())
    plan = await _plan(request, body, "chat", [prompt], body.query(), body.token_limit)
    if plan.resolved.pattern in request.app.state.proxy:
        return await _forward(request, plan, "/chat/completions", body)
    return await _respond(request, service, plan, bool(body.stream))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    service = service_of(request)
    prompts = await run_in_threadpool(service.text_prompts_ids, body.prompts, (body.n or 1))
    plan = await _plan(request, body, "text", prompts, body.prompts[0], (body.max_tokens, "max_tokens"))
    if plan.resolved.pattern in request.app.state.proxy:
        return await _forward(request, plan, "/completions", body)
    return await _respond(request, service, plan, bool(body.stream))


async def _forward(request: Request, plan: _Plan, path: str, body: GenerationRequest) -> Any:
    """This pattern is served by an upstream server (`--upstream`): pass the request on."""
    request.state.route_reason = f"{plan.resolved.how}, upstream"
    body_json = body.model_dump(exclude_unset=True, exclude_none=True)
    return await request.app.state.proxy.forward(plan.resolved.pattern, path, body_json, plan.headers)


def _set(future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    """Resolve `future` from the event loop (scheduled from a worker thread); a cancelled one is left be."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _work(
    service: Service,
    plan: _Plan,
    cancel: threading.Event,
    emit: Callable[[int, Delta], None] | None,
    acquired: asyncio.Future[None],
    loop: asyncio.AbstractEventLoop,
) -> list[Generation]:
    """One request's whole stay on a worker thread: lease the variant (reporting success or the error to
    the handler, which turns it into the status line), generate every prompt's choices, end the lease.
    Acquiring and generating in one call means a request that holds a pin is always running."""
    try:
        variant = service.acquire(plan.resolved.pattern)
    except BaseException as error:
        loop.call_soon_threadsafe(_set, acquired, None, error)
        raise
    loop.call_soon_threadsafe(_set, acquired)
    metrics = service.metrics
    metrics.active.inc()
    done: list[Generation] = []
    try:
        decoder = service.decoder(variant)
        for number, (ids, params) in enumerate(zip(plan.prompts, plan.params, strict=True)):
            if cancel.is_set():
                break
            generation = Generation(variant.model, service.tokenizer, ids, params, service.eos_ids, cancel)
            first = number * plan.n

            def position(delta: Delta, first: int = first) -> None:
                emit(first + delta.index, delta)

            try:
                if decoder is not None:
                    decoder.run(generation, position if emit is not None else None, service.route_of(variant))
                else:
                    for delta in generation:
                        if emit is not None:
                            position(delta)
            finally:
                metrics.tokens.labels("prompt").inc(len(ids))
                metrics.tokens.labels("completion").inc(generation.completion_tokens)
            done.append(generation)
            if generation.cancelled:
                metrics.cancelled.inc()
                break
    finally:
        metrics.active.dec()
        service.release(variant)
    return done


async def _start(
    request: Request, service: Service, plan: _Plan, cancel: threading.Event, emit: Callable[[int, Delta], None] | None
) -> asyncio.Future[list[Generation]]:
    """Start the request's work and wait until its variant is leased (or refused: the error is raised)."""
    loop = asyncio.get_running_loop()
    acquired: asyncio.Future[None] = loop.create_future()
    done = loop.run_in_executor(request.app.state.executor, _work, service, plan, cancel, emit, acquired, loop)
    try:
        await acquired
    except asyncio.CancelledError:
        cancel.set()  # the handler went away while waiting: the work ends at its first token
        raise
    except BaseException:
        done.add_done_callback(lambda future: future.cancelled() or future.exception())  # reported once: here
        raise
    return done


async def _stop_on_disconnect(request: Request, done: asyncio.Future[Any], cancel: threading.Event) -> None:
    """A non-streamed request whose client has gone stops generating."""
    while not done.done():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.25)


def _usage(plan: _Plan, generations: Sequence[Generation]) -> dict[str, int]:
    prompt = sum(len(ids) for ids in plan.prompts)
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(request: Request, service: Service, plan: _Plan, stream: bool) -> Any:
    if stream:
        return await _stream(request, service, plan)
    cancel = threading.Event()
    done = await _start(request, service, plan, cancel, None)
    watcher = asyncio.create_task(_stop_on_disconnect(request, done, cancel))
    try:
        generations = await done
    finally:
        watcher.cancel()
    request.state.completion_tokens = sum(g.completion_tokens for g in generations)
    if cancel.is_set():  # the client left: nobody reads this answer, and the log and metrics say so (nginx's 499)
        return JSONResponse({"error": {"message": "client closed the request", "type": "cancelled"}}, status_code=499)
    texts = [(choice.text, choice.finish_reason) for generation in generations for choice in generation.choices]
    body = completion_body(
        plan.kind, plan.request_id, plan.created, plan.model_id, plan.fingerprint, texts, _usage(plan, generations)
    )
    return JSONResponse(body, headers=plan.headers)


def completion_body(
    kind: str,
    request_id: str,
    created: int,
    model_id: str,
    fingerprint: str,
    texts: Sequence[tuple[str, str | None]],
    usage: dict[str, int],
) -> dict[str, Any]:
    """A whole (non-streamed) chat or text completion as OpenAI shapes it; `texts` are (text,
    finish_reason) in choice order."""
    choices = []
    for index, (text, finish_reason) in enumerate(texts):
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
        choices.append(choice)
    return {
        "id": request_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model_id,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(request: Request, service: Service, plan: _Plan) -> StreamingResponse:
    """Lease the variant (a refusal is still an HTTP error), then stream the generation."""
    loop = asyncio.get_running_loop()
    # unbounded: generation never waits for a slow client (a request's deltas are at most its max_tokens)
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def emit(position: int, delta: Delta) -> None:  # on the worker thread
        loop.call_soon_threadsafe(queue.put_nowait, ("delta", (position, delta)))

    done = await _start(request, service, plan, cancel, emit)

    def finished(future: asyncio.Future[list[Generation]]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("generation failed", exc_info=error)
        queue.put_nowait(("error", error) if error is not None else ("done", future.result()))

    done.add_done_callback(finished)
    return StreamingResponse(
        _events(request, service, plan, queue, cancel), media_type="text/event-stream", headers=plan.headers
    )


async def _events(
    request: Request, service: Service, plan: _Plan, queue: asyncio.Queue[tuple[str, Any]], cancel: threading.Event
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice (chat), content deltas, a finish chunk per choice,
    usage when asked, then `[DONE]`."""
    kind = "chat.completion.chunk" if plan.kind == "chat" else "text_completion"
    started = time.perf_counter()
    first = True

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {
            "id": plan.request_id,
            "object": kind,
            "created": plan.created,
            "model": plan.model_id,
            "system_fingerprint": plan.fingerprint,
            "choices": choices,
        }
        if plan.include_usage:
            payload["usage"] = None
        payload.update(extra)
        return _sse(payload)

    def choice(position: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if plan.kind == "chat":
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            return {"index": position, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": position, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    try:
        if plan.kind == "chat":
            for position in range(len(plan.prompts) * plan.n):
                yield chunk([choice(position, None, None, role=True)])
        while True:
            kind_of, value = await queue.get()
            if kind_of == "delta":
                position, delta = value
                if first and delta.text:
                    service.metrics.first_token.observe(time.perf_counter() - started)
                    first = False
                if delta.text:
                    yield chunk([choice(position, delta.text, None)])
                if delta.finish_reason:
                    yield chunk([choice(position, None, delta.finish_reason)])
            elif kind_of == "done":
                request.state.completion_tokens = sum(g.completion_tokens for g in value)
                if plan.include_usage:
                    yield chunk([], usage=_usage(plan, value))
                break
            else:
                error = APIError(500, f"generation failed: {value}", code="generation_failed")
                yield _sse(error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a client that went away stops the generation at its next token
