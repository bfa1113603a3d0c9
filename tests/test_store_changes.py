"""Changes to the pattern store while routed traffic flows (issue 24): they never hold up a routed request,
never fail one, and damage is reported as it is found. End to end: servers on loopback (uvicorn) on a
copy of models/demo-moe's store, the official `openai` client, and another `PatternStore` on the same
directory standing for another process (`taskmoe calibrate`, a second server)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from demo.evaluate import EVAL_SEED
from demo.tasks import get_task
from pattern_store.pattern import pattern_to_bundle
from pattern_store.store import PatternStore
from server.config import ServerConfig

from conftest import DEMO_MOE
from server_harness import copy_demo_store, running_server

pytestmark = pytest.mark.slow

API_KEY, ADMIN_KEY = "test-key", "admin-key"
POLL = 0.5
TASKS = ("arith", "reverse", "sort", "upper", "spell", "translate")


def _config(store: Path) -> ServerConfig:
    return ServerConfig(model=DEMO_MOE, store=store, api_key=API_KEY, admin_key=ADMIN_KEY, workers=4, store_poll=POLL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(_config(copy_demo_store(tmp_path_factory.mktemp("changes")))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def prompt(task: str, index: int = 0) -> str:
    return get_task(task).examples(index + 1, EVAL_SEED)[index].prompt


def chat(client: openai.OpenAI, text: str, **kwargs):
    kwargs.setdefault("model", "demo-moe")
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 8)
    raw = client.chat.completions.with_raw_response.create(messages=[{"role": "user", "content": text}], **kwargs)
    return raw.parse(), raw.headers


def admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, f"{server.url}/admin{path}", headers=headers, timeout=60, **kwargs)


def wait_for(condition, timeout: float = 15.0, what: str = "the server did not follow the store") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def add_copy(store_dir: Path, source: str, name: str) -> None:
    """Another process writes a copy of pattern `source` named `name`."""
    other = PatternStore(store_dir)
    pattern = other.get(source)
    pattern.name = name
    other.add(pattern, replace=True)


class HeldFitter:
    """The server's fitter, made to wait until released: a fit that takes as long as the test needs."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.fitting, self.release = threading.Event(), threading.Event()

    def run(self, function, *args):
        self.fitting.set()
        self.release.wait(60)
        return self.inner.run(function, *args)


class Warnings(logging.Handler):
    """The warnings a logger emits, whatever the app's logging set-up does with them."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(logger), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Warnings:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


# -- 1. relearning off the request path ----------------------------------------------------------------


def test_a_store_change_never_holds_up_a_routed_request_nor_the_poll(server, client, monkeypatch) -> None:
    """The router used to be relearnt by the first routed request after a change, under a lock, with every
    routed request waiting behind it (5-6 s measured) and the store poll held up too. With a fit held back
    until released: routed requests are answered at their usual speed meanwhile, the poll sees a second
    change during the fit, and the new router serves once it is ready."""
    runtime, store_dir = server.runtime, server.config.store
    chat(client, prompt("sort"))  # warm
    fitter = HeldFitter(runtime.router.fitter)
    monkeypatch.setattr(runtime.router, "fitter", fitter)
    add_copy(store_dir, "upper", "upper-twin")
    wait_for(lambda: "upper-twin" in runtime.store.names())
    wait_for(fitter.fitting.is_set, 5, "the change did not start a fit")
    began = time.perf_counter()
    for task in TASKS:
        _, headers = chat(client, prompt(task))
        assert "upper-twin" not in headers["x-taskmoe-pattern"], "the new router served before it was learnt"
    assert time.perf_counter() - began < 5, "routed requests waited for the fit"
    add_copy(store_dir, "sort", "sort-twin")
    wait_for(lambda: "sort-twin" in runtime.store.names(), 3, "the store poll waited for the fit")
    assert admin(server, "GET", "/store").json()["relearning"] is True
    fitter.release.set()
    wait_for(lambda: runtime.router.learnt_version == runtime.store.version, 120, "the new router never came")
    report = admin(server, "GET", "/store").json()
    assert report["routing_revision"] == report["revision"] and {"upper-twin", "sort-twin"} <= set(report["patterns"])
    _, headers = chat(client, prompt("upper"))
    assert "upper-twin" in headers["x-taskmoe-pattern"], "the relearnt router knows the new pattern"
    for name in ("upper-twin", "sort-twin"):
        assert admin(server, "DELETE", f"/patterns/{name}").status_code == 200


# -- 2. no routed 404 ------------------------------------------------------------------------------------


def test_a_routed_request_whose_patterns_left_before_its_lease_is_answered(server, client, monkeypatch) -> None:
    """The router chose a pattern that another process removed before the request leased it: the client
    named no pattern, so it gets the fallback's answer (here the full model's), never a 404, and
    `x-taskmoe-route` says what happened. A request that names a removed pattern still gets its 404."""
    runtime, store_dir = server.runtime, server.config.store
    resolver = runtime.resolver
    route, removed = resolver.route, []

    def route_then_remove(query: str, **options):
        choice = route(query, **options)
        for name in choice.patterns:  # another process removes what was chosen, before the lease
            PatternStore(store_dir).remove(name)
            removed.append(name)
        runtime.store.refresh()
        return choice

    store_copy_of_upper = PatternStore(store_dir).get("upper")
    add_copy(store_dir, "upper", "upper-gone")
    PatternStore(store_dir).remove("upper")  # so that upper's queries go to the copy alone
    wait_for(lambda: "upper-gone" in runtime.store.names() and "upper" not in runtime.store.names())
    runtime.router.learn()
    changed_before = server.metric("taskmoe_store_changed_routes_total")
    text = prompt("upper")
    monkeypatch.setattr(resolver, "route", route_then_remove)
    try:
        response, headers = chat(client, text, max_tokens=24)
        monkeypatch.setattr(resolver, "route", route)
        assert removed == ["upper-gone"], removed
        assert headers["x-taskmoe-route"] == "store-changed; was=upper-gone"
        assert headers["x-taskmoe-pattern"] == "full" and response.model == "demo-moe"
        full, _ = chat(client, text, model="demo-moe@full", max_tokens=24)
        assert response.choices[0].message.content == full.choices[0].message.content, "not the full model's answer"
        assert server.metric("taskmoe_store_changed_routes_total") == changed_before + 1
        with pytest.raises(openai.NotFoundError):
            chat(client, text, model="demo-moe@upper-gone")
    finally:
        monkeypatch.setattr(resolver, "route", route)
        store = PatternStore(store_dir)
        store.add(store_copy_of_upper, replace=True)
        if "upper-gone" in store:
            store.remove("upper-gone")
        wait_for(lambda: "upper" in runtime.store.names() and "upper-gone" not in runtime.store.names())
        runtime.router.learn()


# -- 3. damage reported as it happens --------------------------------------------------------------------


def test_damage_found_while_serving_is_logged_listed_counted_and_a_503(server, client) -> None:
    """A truncated tensor file (its document unchanged) and a document overwritten with garbage: each is a
    warning naming the file within the poll interval + 2 s, listed by `GET /admin/store`, counted by
    `taskmoe_store_problems`, and a named request for it is a 503 with the reason; repaired, both serve."""
    patterns = server.config.store / "patterns"
    tensor_file = next(patterns.glob("sort.*.safetensors"))
    document = patterns / "spell.json"
    originals = {tensor_file: tensor_file.read_bytes(), document: document.read_bytes()}
    with Warnings("taskmoe.store") as warnings:
        began = time.monotonic()
        try:
            tensor_file.write_bytes(originals[tensor_file][: len(originals[tensor_file]) // 2])
            document.write_text("{ this is not a pattern")
            named = [str(tensor_file.parent / "sort.json"), str(document)]
            wait_for(lambda: all(any(f in m for m in warnings.messages) for f in named), POLL + 2, "no warning")
            assert time.monotonic() - began <= POLL + 2
            report = admin(server, "GET", "/store").json()
            assert {problem["file"] for problem in report["problems"]} == set(named)
            assert "sort" not in report["patterns"] and "spell" not in report["patterns"]
            assert server.metric("taskmoe_store_problems") == 2
            for name, reason in (("sort", "cannot be read"), ("spell", "skipped")):
                response = httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json={"model": f"demo-moe@{name}", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=60,
                )
                error = response.json()["error"]
                assert response.status_code == 503 and error["code"] == "pattern_damaged", response.text
                assert f"pattern '{name}' is damaged" in error["message"] and reason in error["message"]
            _, headers = chat(client, prompt("sort"))  # routed traffic goes on
        finally:
            for path, data in originals.items():
                path.write_bytes(data)
    wait_for(lambda: not admin(server, "GET", "/store").json()["problems"])
    assert server.metric("taskmoe_store_problems") == 0
    for name in ("sort", "spell"):
        _, headers = chat(client, prompt(name), model=f"demo-moe@{name}")
        assert headers["x-taskmoe-pattern"] == name


# -- 4. the smaller findings ------------------------------------------------------------------------------


def test_full_in_a_union_and_long_names_over_http(server, client) -> None:
    text = prompt("sort")
    full, _ = chat(client, text, model="demo-moe@full", max_tokens=16)
    united, headers = chat(client, text, model="demo-moe@full+sort", max_tokens=16)
    assert headers["x-taskmoe-pattern"] == "full"
    assert united.choices[0].message.content == full.choices[0].message.content
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m" * 100_000, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 404 and len(response.text) < 600, response.text[:700]


def _send_and_leave(url: str, body: dict) -> None:
    """A client that sends a streamed request and goes away before reading a byte of the answer."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request + payload)


def test_a_stream_whose_client_left_before_the_answer_began_stops_and_counts(server) -> None:
    """Streams cut by their clients under churn ran on to max_tokens 7 times in 50: a client gone before
    the response started (while its request waited for a lease) left Starlette nothing to cancel, the
    events never having been iterated. Each must stop within a couple of tokens and be counted."""
    body = {
        "model": "demo-moe@reverse",
        "messages": [{"role": "user", "content": prompt("reverse")}],
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    for _ in range(3):
        cancelled = server.metric("taskmoe_generations_cancelled_total")
        tokens = server.metric("taskmoe_tokens_total", 'kind="completion"')
        _send_and_leave(server.url, body)
        wait_for(lambda c=cancelled: server.metric("taskmoe_generations_cancelled_total") > c, 20, "never counted")
        wait_for(lambda: server.metric("taskmoe_active_generations") == 0, 20, "the generation ran on")
        generated = server.metric("taskmoe_tokens_total", 'kind="completion"') - tokens
        assert server.metric("taskmoe_generations_cancelled_total") == cancelled + 1
        assert generated <= 2, f"{generated} tokens generated for a client that had left"


# -- the whole case: two servers on one store, routed load, churn -------------------------------------------


def test_two_servers_on_one_store_answer_every_routed_request_under_churn(server, tmp_path) -> None:
    """A second server on the same store, routed load on both, and patterns registered and removed every
    half second through either server's admin API and by another process: every routed request is a 200."""
    store_dir = server.config.store
    with running_server(_config(store_dir)) as second:
        servers = [server, second]
        stop = threading.Event()
        statuses: Counter[int] = Counter()
        routes: Counter[str] = Counter()

        def load(worker: int) -> None:
            http = httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            for count in range(10_000):
                if stop.is_set():
                    return
                target = servers[(worker + count) % 2]
                task = TASKS[(worker + count) % len(TASKS)]
                body = {"model": "demo-moe", "messages": [{"role": "user", "content": prompt(task)}], "max_tokens": 4}
                response = http.post(f"{target.url}/v1/chat/completions", json=body)
                statuses[response.status_code] += 1
                routes[response.headers.get("x-taskmoe-route", "?").split(";")[0]] += 1

        def churn() -> None:
            for round in range(10_000):
                if stop.is_set():
                    return
                name = f"churn-{round}"
                if round % 3 == 2:
                    add_copy(store_dir, TASKS[round % len(TASKS)], name)  # another process
                else:
                    pattern = servers[round % 2].runtime.store.get(TASKS[round % len(TASKS)])
                    pattern.name = name
                    admin(servers[round % 2], "POST", "/patterns/import", content=pattern_to_bundle(pattern))
                if round:
                    previous = f"churn-{round - 1}"
                    response = admin(servers[(round + 1) % 2], "DELETE", f"/patterns/{previous}")
                    if response.status_code == 404:  # not seen there yet: another process removes it
                        PatternStore(store_dir).remove(previous)
                time.sleep(0.5)

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(load, worker) for worker in range(4)] + [pool.submit(churn)]
            time.sleep(20)
            stop.set()
            for future in futures:
                future.result()
        store = PatternStore(store_dir)
        for name in store.names():
            if name.startswith("churn-"):
                store.remove(name)
    assert sum(statuses.values()) >= 20, statuses
    assert set(statuses) == {200}, f"routed answers by status: {dict(statuses)}; routes: {dict(routes)}"


def test_a_pattern_replaced_mid_request_serves_that_request_with_what_it_leased(server, client) -> None:
    """A stream holding pattern `held` (upper's experts) while another process replaces `held` with
    reverse's: the stream ends as upper's variant answers, and the next request gets reverse's."""
    runtime, store_dir = server.runtime, server.config.store
    add_copy(store_dir, "upper", "held")
    wait_for(lambda: "held" in runtime.store.names())
    text = prompt("upper")
    params = {"max_tokens": 200, "extra_body": {"ignore_eos": True}}
    as_upper, _ = chat(client, text, model="demo-moe@upper", **params)
    as_reverse, _ = chat(client, text, model="demo-moe@reverse", **params)
    assert as_upper.choices[0].message.content != as_reverse.choices[0].message.content
    revision = runtime.store.revisions()["held"]
    stream = client.chat.completions.create(
        model="demo-moe@held", messages=[{"role": "user", "content": text}], temperature=0, stream=True, **params
    )
    pieces, seen_at = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if len(pieces) == 4:  # leased and decoding: now another process replaces the pattern
            add_copy(store_dir, "reverse", "held")
            runtime.watcher.check()  # what the next poll does: the server sees the change, forgets the old
            assert runtime.store.revisions()["held"] != revision
            seen_at = server.metric("taskmoe_active_generations")
    assert seen_at == 1, "the generation had ended before the server saw the change"
    assert "".join(pieces) == as_upper.choices[0].message.content, "the stream changed experts mid-way"
    after, _ = chat(client, text, model="demo-moe@held", **params)
    assert after.choices[0].message.content == as_reverse.choices[0].message.content
    assert admin(server, "DELETE", "/patterns/held").status_code == 200
