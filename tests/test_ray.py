"""taskmoe on Ray Serve: a local Ray instance, 2 replicas, requests of two tasks. Each task is served by the
replica that holds its variant, and variants are built once per task, not once per request."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from pattern_store.store import PatternStore
from server.config import ServerConfig

from conftest import DEMO_MOE, ROOT
from server_harness import copy_demo_store, running_server

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow
APP_DIR = ROOT / "deploy" / "ray"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory) -> Path:
    """The Ray app's pattern store: a copy of the demo's, which a test writes to."""
    return copy_demo_store(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def ray_app(ray_store):
    sys.path.insert(0, str(APP_DIR))
    import taskmoe_ray

    # Ray's processes keep Python's default warning filters, not the suite's (PYTHONWARNINGS, see conftest):
    # Ray 2.60's dashboard and Serve controller still call pydantic v1's API at import. The code they run for
    # taskmoe is the same that runs in this process, under the suite's filters.
    warning_filters = os.environ.pop("PYTHONWARNINGS")
    try:
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(APP_DIR), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}},
        )
    finally:
        os.environ["PYTHONWARNINGS"] = warning_filters
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {"model": str(DEMO_MOE), "store": str(ray_store), "store_poll": "1"}
        app = taskmoe_ray.build_app(settings | {"replicas": "2", "cpus": "1", "ingress_cpus": "1"})
        serve.run(app, name="taskmoe", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        sys.path.remove(str(APP_DIR))


def ask(url: str, prompt: str) -> httpx.Response:
    body = {"model": "demo-moe", "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_each_task_is_served_by_the_replica_holding_its_variant(ray_app) -> None:
    prompts = {"sort": "Please sort: 9, 2, 5", "upper": "Make this uppercase: hello happy"}
    answers = {"sort": "2, 5, 9", "upper": "HELLO HAPPY"}
    served: dict[str, set[str]] = {"sort": set(), "upper": set()}
    builds: dict[str, str] = {}
    for round_ in range(4):
        for task, prompt in prompts.items():
            response = ask(ray_app, prompt)
            assert response.headers["x-taskmoe-pattern"] == task
            assert response.json()["choices"][0]["message"]["content"] == answers[task]
            replica = response.headers["x-taskmoe-replica"]
            served[task].add(replica)
            builds[replica] = response.headers["x-taskmoe-replica-builds"]
            if round_ == 0:
                time.sleep(1.0)  # let the replica's newly loaded variant reach Serve's request router
    assert all(len(replicas) == 1 for replicas in served.values()), served
    counts = [int(part.split("=")[1]) for text in builds.values() for part in text.split(",") if part]
    assert sum(counts) == 2, f"variants built per replica: {builds}"  # one per task, not one per request


def test_ray_app_errors_are_openai_errors(ray_app) -> None:
    response = httpx.post(
        f"{ray_app}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    models = httpx.get(f"{ray_app}/v1/models", timeout=60).json()
    assert "demo-moe@sort" in {m["id"] for m in models["data"]}


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """`taskmoe serve` on the same model and patterns as the Ray app."""
    store = copy_demo_store(tmp_path_factory.mktemp("serve"))
    with running_server(ServerConfig(model=DEMO_MOE, store=store, workers=4)) as running:
        yield running.url


GOOD = [
    {"model": "demo-moe", "messages": [{"role": "user", "content": "Please sort: 9, 2, 5"}]},
    {"model": "demo-moe", "messages": [{"role": "user", "content": "Spell 'tanumi' backwards."}]},
    {"model": "demo-moe@arith+sort", "messages": [{"role": "user", "content": "What is 7 + 5?"}]},
    {"model": "demo-moe@full", "messages": [{"role": "user", "content": "Make this uppercase: good day"}]},
]
BAD = [
    {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe@", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe@poetry", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe@sort+", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe", "n": 17, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe", "messages": [{"role": "user", "content": "a" * 20_000}]},
    {"model": "demo-moe", "max_tokens": 100_000, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe", "logit_bias": {"1": 2}, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe", "temperature": 3, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "demo-moe", "messages": []},
]


def test_the_ray_app_answers_as_taskmoe_serve_does(ray_app, local_server) -> None:
    """Greedy answers, the pattern that served and the usage are the same through both front ends."""
    for body in GOOD:
        body = {**body, "temperature": 0, "max_tokens": 16}
        ours, theirs = (
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120) for url in (ray_app, local_server)
        )
        assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
        assert ours.headers["x-taskmoe-pattern"] == theirs.headers["x-taskmoe-pattern"]
        assert ours.json()["choices"] == theirs.json()["choices"] and ours.json()["usage"] == theirs.json()["usage"]
        assert ours.json()["model"] == theirs.json()["model"]
    prompts = {
        "model": "demo-moe",
        "prompt": ["Please sort: 3, 1", "What is 2 + 2?"],
        "temperature": 0,
        "max_tokens": 8,
    }
    ours, theirs = (httpx.post(f"{url}/v1/completions", json=prompts, timeout=120) for url in (ray_app, local_server))
    assert ours.status_code == theirs.status_code == 200 and ours.json()["choices"] == theirs.json()["choices"]


def test_the_ray_app_refuses_what_taskmoe_serve_refuses(ray_app, local_server) -> None:
    def refusal(url: str, body: dict) -> tuple[int, str | None, str | None]:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        error = response.json()["error"]
        return response.status_code, error["code"], error["param"]

    for body in BAD:
        ours, theirs = refusal(ray_app, body), refusal(local_server, body)
        assert ours == theirs and ours[0] in (400, 404), (body, ours, theirs)
    too_many = {"model": "demo-moe", "prompt": ["x"] * 100, "n": 2}
    statuses = {
        httpx.post(f"{url}/v1/completions", json=too_many, timeout=60).status_code for url in (ray_app, local_server)
    }
    assert statuses == {400}


def test_the_ray_app_follows_its_store(ray_app, ray_store) -> None:
    """A pattern written by another process is served, and once replaced, its replacement serves: the
    ingress and every replica follow the store (last in this file: the tests above route on the demo store)."""
    other = PatternStore(ray_store)
    copy = other.get("upper")
    copy.name = "copied"
    other.add(copy)
    body = {"model": "demo-moe@copied", "messages": [{"role": "user", "content": "Make this uppercase: hello happy"}]}
    body |= {"temperature": 0, "max_tokens": 16}

    def answer(model: str) -> str:
        response = httpx.post(f"{ray_app}/v1/chat/completions", json=body | {"model": model}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    deadline = time.monotonic() + 30
    while "demo-moe@copied" not in {m["id"] for m in httpx.get(f"{ray_app}/v1/models", timeout=60).json()["data"]}:
        assert time.monotonic() < deadline, "the ingress did not follow the store"
        time.sleep(0.5)
    assert answer("demo-moe@copied") == answer("demo-moe@upper")
    expected = answer("demo-moe@arith")
    assert expected != answer("demo-moe@upper"), "the test needs two patterns that answer apart"
    replacement = other.get("arith")
    replacement.name = "copied"
    other.add(replacement, replace=True)
    deadline = time.monotonic() + 30
    while answer("demo-moe@copied") != expected:  # every replica that served "copied" forgets its old experts
        assert time.monotonic() < deadline, "a replica served the replaced pattern's old experts"
        time.sleep(0.5)
    for _ in range(4):  # whichever replica Serve picks now
        assert answer("demo-moe@copied") == expected
    other.remove("copied")
