"""Forwarding a pattern's requests to an upstream OpenAI-compatible server.

When one task's variant outgrows a GPU, it is exported (`taskmoe export`) and served by vLLM or SGLang
with tensor or expert parallelism; taskmoe keeps routing, and sends that pattern's requests there.
Configured per pattern as `PATTERN=URL` or `PATTERN=URL#MODEL` (URL is the upstream's `/v1` base; MODEL
is the name the upstream serves, otherwise asked from its `/v1/models` on first use).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from server.config import Upstream
from server.errors import APIError

log = logging.getLogger("taskmoe.proxy")

_PASSED_HEADERS = ("content-type", "retry-after", "x-request-id")


class UpstreamProxy:
    def __init__(self, upstreams: dict[str, Upstream], timeout: float = 600.0) -> None:
        self.upstreams = upstreams
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))
        self._lock = asyncio.Lock()
        self._models: dict[str, str] = {}  # pattern -> model name discovered from its upstream

    def __contains__(self, pattern: str | None) -> bool:
        return pattern is not None and pattern in self.upstreams

    async def close(self) -> None:
        await self._client.aclose()

    async def _model(self, upstream: Upstream) -> str:
        """The upstream's model name: given in the spec, or asked of the upstream once."""
        if upstream.model is not None:
            return upstream.model
        if upstream.pattern not in self._models:
            async with self._lock:
                if upstream.pattern not in self._models:
                    response = await self._client.get(f"{upstream.base_url}/models")
                    response.raise_for_status()
                    self._models[upstream.pattern] = response.json()["data"][0]["id"]
        return self._models[upstream.pattern]

    async def forward(self, pattern: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> Response:
        """Send `body` (its model replaced by the upstream's) to the upstream's `path`; stream the answer
        back as it comes when the request asked for a stream."""
        upstream = self.upstreams[pattern]
        unreachable = f"the upstream for pattern {pattern!r} ({upstream.base_url}) cannot be reached"
        try:
            payload = {**body, "model": await self._model(upstream)}
            payload.pop("pattern", None)
            request = self._client.build_request("POST", f"{upstream.base_url}{path}", json=payload)
            response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            log.warning("%s: %s", unreachable, error)
            raise APIError(502, unreachable, code="upstream_unavailable") from None
        passed = {k: v for k, v in response.headers.items() if k.lower() in _PASSED_HEADERS}
        passed.update(headers)
        passed["x-taskmoe-upstream"] = upstream.base_url
        if body.get("stream"):
            return StreamingResponse(
                response.aiter_raw(),
                status_code=response.status_code,
                headers=passed,
                background=BackgroundTask(response.aclose),
            )
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return Response(content, status_code=response.status_code, headers=passed)
