"""`taskmoe serve --static-decode on` end to end: the expert pool's batch in a static cache (`static_rows`; on
the CPU its steps run eagerly) answers what the growing cache answers. Apart from `test_static_rows.py`, whose
tests marked `gpu` run on a bare CUDA image without the server's packages."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from demo.tasks import get_task
from server.config import ServerConfig

from conftest import DEMO_MOE
from server_harness import copy_demo_store, running_server


@pytest.mark.slow
def test_the_server_answers_the_same_from_the_static_cache(tmp_path) -> None:
    """`taskmoe serve --static-decode on` (eager on the CPU) against `off`, concurrent requests of six
    patterns, routed and named, some longer than the static cache: the same greedy answers, and the static
    steps did run (the cache report says so)."""
    jobs = [
        (task, example.prompt, 8 + 4 * (i % 3))
        for task in ("arith", "sort", "upper", "spell", "reverse", "translate")
        for i, example in enumerate(get_task(task).examples(3, 91))
    ]
    answers: dict[str, list[str]] = {}
    for mode in ("off", "on"):
        store = copy_demo_store(tmp_path / mode)
        config = ServerConfig(
            model=DEMO_MOE, store=store, static_decode=mode, static_cache_tokens=48, admin_key="admin-key"
        )
        with running_server(config) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

            def ask(job: tuple[str, str, int], client=client) -> str:
                task, prompt, max_tokens = job
                model = "demo-moe" if max_tokens == 12 else f"demo-moe@{task}"
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
                )
                return reply.choices[0].message.content

            with ThreadPoolExecutor(8) as pool:
                answers[mode] = list(pool.map(ask, jobs))
            headers = {"Authorization": "Bearer admin-key"}
            report = httpx.get(f"{server.url}/admin/cache", headers=headers, timeout=10).json()["pool"]
            if mode == "on":
                static = report["static_decode"]
                assert static["steps"] > 0 and static["columns"] == 48 and static["graphs"] == []
            else:
                assert "static_decode" not in report
    assert answers["on"] == answers["off"]
