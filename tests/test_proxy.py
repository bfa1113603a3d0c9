"""A pattern served by an upstream server: a second taskmoe instance stands in for vLLM or SGLang."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.config import ServerConfig, parse_upstreams

from conftest import DEMO_MOE
from server_harness import copy_demo_store, running_server

pytestmark = pytest.mark.slow


def test_upstream_specs() -> None:
    parsed = parse_upstreams(["sort=http://gpu-7:8000/v1#my-sort", "upper=https://x/v1/"])
    assert parsed["sort"].base_url == "http://gpu-7:8000/v1" and parsed["sort"].model == "my-sort"
    assert parsed["upper"].base_url == "https://x/v1" and parsed["upper"].model is None
    assert set(parse_upstreams("a=http://h/v1,b=http://h/v1")) == {"a", "b"}
    for bad in (["sort"], ["sort=ftp://x"], ["=http://x"], ["a=http://x", "a=http://y"]):
        with pytest.raises(ValueError, match="upstream"):
            parse_upstreams(bad)


def test_pattern_requests_are_forwarded_to_the_upstream(tmp_path) -> None:
    upstream_config = ServerConfig(model=DEMO_MOE, store=copy_demo_store(tmp_path / "b"), workers=2)
    with running_server(upstream_config) as upstream:
        specs = (f"sort={upstream.url}/v1#demo-moe@sort", f"upper={upstream.url}/v1", "arith=http://127.0.0.1:9/v1#x")
        config = ServerConfig(model=DEMO_MOE, store=copy_demo_store(tmp_path / "a"), upstream=specs, workers=2)
        with running_server(config) as front:
            client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)
            served_before = upstream.metric("taskmoe_requests_total", 'route="/v1/chat/completions",status="200"')
            messages = [{"role": "user", "content": "Please sort: 9, 2, 5"}]
            raw = client.chat.completions.with_raw_response.create(model="demo-moe", messages=messages, temperature=0)
            reply = raw.parse()
            assert raw.headers["x-taskmoe-pattern"] == "sort"
            assert raw.headers["x-taskmoe-upstream"] == f"{upstream.url}/v1"
            assert reply.choices[0].message.content == "2, 5, 9" and reply.model == "demo-moe@sort"

            stream = client.chat.completions.create(model="demo-moe", messages=messages, temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "2, 5, 9"

            upper = [{"role": "user", "content": "Make this uppercase: hello happy"}]
            reply = client.chat.completions.create(model="demo-moe", messages=upper, temperature=0)
            assert reply.choices[0].message.content == "HELLO HAPPY"  # the upstream routed "demo-moe" itself

            served = upstream.metric("taskmoe_requests_total", 'route="/v1/chat/completions",status="200"')
            assert served - served_before == 3
            assert not {"sort", "upper"} & {entry["pattern"] for entry in front.runtime.leases.report()["data"]}

            down = httpx.post(
                f"{front.url}/v1/chat/completions",
                json={"model": "demo-moe@arith", "messages": [{"role": "user", "content": "How much is 4 plus 5?"}]},
            )
            assert down.status_code == 502 and json.loads(down.text)["error"]["code"] == "upstream_unavailable"
