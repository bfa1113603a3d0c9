"""taskmoe on Ray Serve: a local Ray instance, 2 replicas, requests of two tasks. Each task is served by the
replica that holds its variant, and variants are built once per task, not once per request."""

from __future__ import annotations

import os
import socket
import sys
import time

import httpx
import pytest

from conftest import DEMO_MOE, ROOT

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow
APP_DIR = ROOT / "deploy" / "ray"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app():
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
        app = taskmoe_ray.build_app({"model": str(DEMO_MOE), "replicas": "2", "cpus": "1", "ingress_cpus": "1"})
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
