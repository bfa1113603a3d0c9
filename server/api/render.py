"""A started completion as OpenAI shapes it: one JSON body, or server-sent events (a role chunk per choice,
content deltas, a finish chunk per choice, usage when asked, `[DONE]`); or, for a pattern an upstream
server answers, that server's response passed through."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from server.api.schemas import GenerationRequest
from server.completions import Answer, Started
from server.errors import APIError
from server.metrics import Metrics
from server.plan import Plan
from server.proxy import UpstreamProxy

UPSTREAM_PATHS = {"chat": "/chat/completions", "text": "/completions"}


def completion_body(
    kind: str,
    request_id: str,
    created: int,
    model_id: str,
    fingerprint: str,
    texts: Sequence[tuple[str, str | None]],
    usage: dict[str, int],
) -> dict[str, Any]:
    """A whole (non-streamed) chat or text completion; `texts` are (text, finish_reason) in choice order."""
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


def usage(plan: Plan, completion_tokens: int) -> dict[str, int]:
    prompt = plan.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def whole_body(plan: Plan, answer: Answer) -> dict[str, Any]:
    return completion_body(
        plan.kind,
        plan.request_id,
        plan.created,
        plan.model_id,
        plan.fingerprint,
        answer.texts,
        usage(plan, answer.completion_tokens),
    )


async def respond(
    request: Request, started: Started, proxy: UpstreamProxy, metrics: Metrics, body: GenerationRequest
) -> Response:
    """The HTTP response of a started completion (`body`: the request, passed on to an upstream server)."""
    plan = started.plan
    request.state.pattern, request.state.route_reason = plan.choice.label, plan.choice.how
    if plan.upstream:
        request.state.route_reason = f"{plan.choice.how}, upstream"
        sent = body.model_dump(exclude_unset=True, exclude_none=True)
        return await proxy.forward(plan.choice.label, UPSTREAM_PATHS[plan.kind], sent, plan.headers)
    if started.events is not None:  # streamed
        return CancellingStream(started, _events(request, started, metrics), headers=plan.headers)
    watcher = asyncio.create_task(_stop_on_disconnect(request, started))
    try:
        answer = await started.answer()
    finally:
        watcher.cancel()
    request.state.completion_tokens = answer.completion_tokens
    if started.cancel.is_set():  # the client left: nobody reads this answer, and the log and metrics say so (499)
        return JSONResponse({"error": {"message": "client closed the request", "type": "cancelled"}}, status_code=499)
    return JSONResponse(whole_body(plan, answer), headers=plan.headers)


class CancellingStream(StreamingResponse):
    """Server-sent events that stop their generation however the response ends. The events' own `finally`
    (`Started.stream`) runs only when the generator is closed: cancelled while Starlette waits in `send`
    (the client's socket full), the generator is left suspended and closed by the garbage collector, later,
    while the generation runs on for nobody. (Whether this caused the run-ons a probe saw under churn is
    not established: a client gone before the answer began does not reproduce them.)"""

    def __init__(self, started: Started, content: AsyncIterator[str], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.cancel = started.cancel

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()  # after a whole answer it changes nothing: the generation has ended


async def _stop_on_disconnect(request: Request, started: Started) -> None:
    """A non-streamed request whose client has gone stops generating."""
    while not started.done.done():
        if await request.is_disconnected():
            started.cancel.set()
            return
        await asyncio.sleep(0.25)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _chunk(plan: Plan, choices: list[dict[str, Any]], **extra: Any) -> str:
    payload = {
        "id": plan.request_id,
        "object": "chat.completion.chunk" if plan.kind == "chat" else "text_completion",
        "created": plan.created,
        "model": plan.model_id,
        "system_fingerprint": plan.fingerprint,
        "choices": choices,
    }
    if plan.include_usage:
        payload["usage"] = None
    payload.update(extra)
    return _sse(payload)


def _choice(
    plan: Plan, position: int, text: str | None, finish_reason: str | None, role: bool = False
) -> dict[str, Any]:
    if plan.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": position, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": position, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


async def _events(request: Request, started: Started, metrics: Metrics) -> AsyncIterator[str]:
    plan = started.plan
    began, first = time.perf_counter(), True
    if plan.kind == "chat":
        for position in range(len(plan.prompts) * plan.n):
            yield _chunk(plan, [_choice(plan, position, None, None, role=True)])
    async for kind, value in started.stream():
        if kind == "delta":
            position, delta = value
            if first and delta.text:
                metrics.first_token.observe(time.perf_counter() - began)
                first = False
            if delta.text:
                yield _chunk(plan, [_choice(plan, position, delta.text, None)])
            if delta.finish_reason:
                yield _chunk(plan, [_choice(plan, position, None, delta.finish_reason)])
        elif kind == "done":
            request.state.completion_tokens = value.completion_tokens
            if plan.include_usage:
                yield _chunk(plan, [], usage=usage(plan, value.completion_tokens))
        else:
            yield _sse(APIError(500, f"generation failed: {value}", code="generation_failed").body())
    yield "data: [DONE]\n\n"
