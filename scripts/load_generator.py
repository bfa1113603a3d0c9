#!/usr/bin/env python3
"""An HTTP load generator for `taskmoe serve`, run in a process of its own so that it never shares an
interpreter, a GIL or a thread pool with what it measures: asyncio, and one `httpx.AsyncClient` per client
(one keep-alive connection each, no pool limit to queue behind), no thread per request.

    python scripts/load_generator.py '{"url": "http://127.0.0.1:8000", "models": ["demo-moe@sort"],
        "prompts": ["Sort: 3, 1"], "clients": 32, "requests": 128, "stream": true, "max_tokens": 64}'

Request `i` asks `models[i % len(models)]` (round robin) with `prompts[i % len(prompts)]`, greedy, with
`ignore_eos` unless the spec says otherwise; `start_delay` (seconds) holds the first request back.

Prints one JSON object: per request its status, latency, completion tokens, and (streamed) its time to
first token and the gaps between its tokens; the wall time; and this process's own CPU time, so that a
reader can check that the generator, not the server, was the limit.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from typing import Any

import httpx


def _body(spec: dict[str, Any], index: int) -> dict[str, Any]:
    body = {
        "model": spec["models"][index % len(spec["models"])],
        "messages": [{"role": "user", "content": spec["prompts"][index % len(spec["prompts"])]}],
        "max_tokens": spec["max_tokens"],
        "temperature": 0,
        "ignore_eos": spec.get("ignore_eos", True),
        "stream": spec["stream"],
    }
    if spec["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


async def _whole(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - started
    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
    return {"status": response.status_code, "latency": latency, "tokens": tokens}


async def _streamed(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Server-sent events: the arrival of every chunk with content (TTFT, gaps), and the usage chunk."""
    started, wall_started = time.perf_counter(), time.time()
    arrivals: list[float] = []
    stamps: list[float] = []  # wall-clock arrivals, comparable with another generator process
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter() - started)
                stamps.append(time.time())
    return {
        "status": response.status_code,
        "latency": time.perf_counter() - started,
        "tokens": tokens,
        "ttft": arrivals[0] if arrivals else None,
        "gaps": [b - a for a, b in itertools.pairwise(arrivals)],
        "started_at": wall_started,
        "arrived_at": stamps,
    }


async def _one(client: httpx.AsyncClient, spec: dict[str, Any], index: int) -> dict[str, Any]:
    """One request; a transport error is a result (status 0), not the end of the run."""
    body = _body(spec, index)
    started = time.perf_counter()
    try:
        result = await (_streamed(client, body) if spec["stream"] else _whole(client, body))
    except httpx.HTTPError as error:
        result = {"status": 0, "latency": time.perf_counter() - started, "tokens": 0, "error": repr(error)}
    return {"pattern": body["model"], **result}


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _clients(spec: dict[str, Any]) -> list[httpx.AsyncClient]:
    """One client, hence one keep-alive connection, per concurrent client of the spec; made before the clock
    starts, since building them is set-up, not load. Plain HTTP on loopback: `verify=False` skips loading a
    certificate bundle per client, and `trust_env=False` keeps a proxy from the environment out of the way."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return [
        httpx.AsyncClient(base_url=spec["url"], timeout=600, limits=limits, trust_env=False, verify=False)
        for _ in range(spec["clients"])
    ]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec["requests"]` requests taken from one queue by `spec["clients"]` concurrent clients."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(spec["requests"]):
        queue.put_nowait(index)
    results: list[dict[str, Any]] = []

    async def client_loop(number: int, client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append({"client": number, **await _one(client, spec, queue.get_nowait())})

    clients = _clients(spec)
    try:
        await asyncio.sleep(spec.get("start_delay", 0.0))
        (user_before, system_before), wall_before = _cpu(), time.perf_counter()
        await asyncio.gather(*(client_loop(number, client) for number, client in enumerate(clients)))
        wall = time.perf_counter() - wall_before
        user, system = (after - before for after, before in zip(_cpu(), (user_before, system_before), strict=True))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    return {
        "wall_s": wall,
        "cpu_s": user + system,
        "cpu_user_s": user,
        "cpu_system_s": system,
        "cpu_share_of_a_core": (user + system) / wall if wall else 0.0,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "results": results,
    }


def main() -> int:
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(run(spec))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
