"""Property-based fuzzing of the request bodies against a real server, and the probes that found holes.

Whatever a client sends, the answer is never a 5xx and an error is always an OpenAI error body; the stored
patterns survive. The number of examples is bounded so that `make test` stays quick.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo.tasks import get_task
from server.config import ServerConfig, load_config

from conftest import DEMO_MOE
from server_harness import copy_demo_store, running_server

API_KEY, ADMIN_KEY = "fuzz-key", "fuzz-admin"
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = copy_demo_store(tmp_path_factory.mktemp("fuzz"))
    config = ServerConfig(model=DEMO_MOE, store=store, api_key=API_KEY, admin_key=ADMIN_KEY, workers=4)
    with running_server(config) as running:
        yield running


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", "", "x"]) | values,
            "content": st.text(max_size=60) | values,
        }
    ),
    max_size=3,
)
short = st.integers(min_value=-2, max_value=4) | values  # generation stays short when a body happens to be valid
chat_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["demo-moe", "demo-moe@sort", "demo-moe@full", "demo-moe@", "nope", "demo-moe@../x"])
        | values
    },
    optional={
        "messages": messages | values,
        "max_tokens": short,
        "temperature": values,
        "top_p": values,
        "n": st.integers(min_value=-1, max_value=3) | values,
        "stop": values,
        "seed": values,
        "stream": st.booleans() | values,
        "pattern": values,
        "logprobs": values,
    },
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["demo-moe", "demo-moe@upper"]) | values},
    optional={
        "prompt": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3) | values,
        "max_tokens": short,
        "n": short,
        "echo": values,
        "suffix": values,
    },
)
route_bodies = st.fixed_dictionaries(
    {}, optional={"input": values, "prompt": values, "messages": messages | values, "model": values, "pattern": values}
)
register_bodies = st.fixed_dictionaries(
    {"name": st.text(max_size=20) | values},
    optional={
        "prompts": st.lists(st.text(max_size=30) | values, max_size=3) | values,
        "keep": values,
        "keep_experts": values,
        "target": values,
        "method": values,
        "refine": values,
        "budget": values,
        "replace": st.just(False) | values,
    },
)


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"]


def _post(server, path: str, body: object, key: str = API_KEY) -> httpx.Response:
    content = json.dumps(body, allow_nan=True)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)


@FUZZ
@given(body=chat_bodies)
def test_fuzzed_chat_bodies_never_fail_the_server(server, body) -> None:
    _check(_post(server, "/v1/chat/completions", body))


@FUZZ
@given(body=completion_bodies)
def test_fuzzed_completion_bodies_never_fail_the_server(server, body) -> None:
    _check(_post(server, "/v1/completions", body))


@FUZZ
@given(body=route_bodies)
def test_fuzzed_route_bodies_never_fail_the_server(server, body) -> None:
    _check(_post(server, "/v1/route", body))


@settings(FUZZ, max_examples=25)
@given(body=register_bodies)
def test_fuzzed_admin_bodies_never_fail_the_server_nor_lose_a_pattern(server, body) -> None:
    before = set(server.runtime.store.names())
    response = _post(server, "/admin/patterns", body, key=ADMIN_KEY)
    _check(response)
    if response.status_code == 202:  # a valid job: let it finish before the next example
        job_id = response.json()["id"]
        for _ in range(600):
            job = httpx.get(
                f"{server.url}/admin/jobs/{job_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ).json()
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
    assert before <= set(server.runtime.store.names())


def test_raw_garbage_and_wrong_content_types_are_400s(server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for content, content_type in [
        (b"\xff\xfe\x00garbage", "application/json"),
        (b'{"model": "demo-moe", "messages": [', "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b"model=demo-moe", "application/x-www-form-urlencoded"),
        (
            b'{"model": "demo-moe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
            "application/json",
        ),
    ]:
        response = httpx.post(
            f"{server.url}/v1/chat/completions", content=content, headers={**headers, "Content-Type": content_type}
        )
        assert response.status_code == 400, (content, response.text)
        _check(response)


def test_a_client_that_leaves_is_counted_as_cancelled_499(server) -> None:
    """A non-streamed request whose client went away used to be logged as 200."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=0.3)
    prompt = get_task("sort").examples(1, 5)[0].prompt
    before = server.metric("taskmoe_requests_total", 'route="/v1/chat/completions",status="499"')
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(
            model="demo-moe@sort",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=200,
            n=16,
            extra_body={"ignore_eos": True},
        )
    for _ in range(100):
        if server.metric("taskmoe_requests_total", 'route="/v1/chat/completions",status="499"') > before:
            break
        time.sleep(0.1)
    assert server.metric("taskmoe_requests_total", 'route="/v1/chat/completions",status="499"') == before + 1
    assert server.metric("taskmoe_generations_cancelled_total") >= 1


def test_the_openapi_schema_says_400_where_the_server_answers_400(server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses and "400" in responses
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert not any("422" in op.get("responses", {}) for ops in schema["paths"].values() for op in ops.values())


def test_metrics_can_be_closed_to_anonymous_readers(tmp_path) -> None:
    config = ServerConfig(
        model=DEMO_MOE, store=copy_demo_store(tmp_path), api_key=API_KEY, admin_key=ADMIN_KEY, metrics_public=False
    )
    with running_server(config) as closed:
        assert httpx.get(f"{closed.url}/metrics").status_code == 401
        assert httpx.get(f"{closed.url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for key in (API_KEY, ADMIN_KEY):
            opened = httpx.get(f"{closed.url}/metrics", headers={"Authorization": f"Bearer {key}"})
            assert opened.status_code == 200 and "taskmoe_requests_total" in opened.text
    with pytest.raises(ValueError, match="metrics-public"):
        load_config(model=DEMO_MOE, store=tmp_path, metrics_public=False)


def test_concurrent_hostile_bodies_leave_the_server_serving(server) -> None:
    errors: list[int] = []

    def hostile(i: int) -> None:
        body = {"model": "demo-moe", "messages": [{"role": "user", "content": "\ud800" * (i % 3) + "x" * i}], "n": 200}
        response = _post(server, "/v1/chat/completions", body)
        if response.status_code >= 500:
            errors.append(response.status_code)

    threads = [threading.Thread(target=hostile, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    ok = _post(
        server,
        "/v1/chat/completions",
        {"model": "demo-moe@sort", "messages": [{"role": "user", "content": "Sort: 2, 1"}], "max_tokens": 4},
    )
    assert ok.status_code == 200
