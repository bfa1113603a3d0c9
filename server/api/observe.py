"""Per-request bookkeeping as plain ASGI middleware (so streamed responses are timed to their last byte):
a request id (the client's `x-request-id`, or a new one) echoed in the response, request metrics, and one
structured log line per request."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

log = logging.getLogger("taskmoe.access")

Scope = dict[str, Any]


class RequestObserver:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming[:64] if incoming.isprintable() and incoming else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            if metrics is not None:
                metrics.requests.labels(label, str(status)).inc()
                metrics.latency.labels(label).observe(elapsed)
            log.info(
                "%s %s %s",
                scope.get("method"),
                scope.get("path"),
                status,
                extra={
                    "request_id": request_id,
                    "status": status,
                    "seconds": round(elapsed, 4),
                    **{k: v for k, v in state.items() if k in ("pattern", "route_reason", "completion_tokens")},
                },
            )
