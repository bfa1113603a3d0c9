"""Refusing and forwarding cost no model work: a 400 or a 404 is answered, and a request for a pattern an
upstream server answers is forwarded, before the model's tokenizer sees the request; and a completion's
routing runs no search of the example index, whose result (each candidate's nearest-example similarity)
only `/v1/route` reports. Counted on the real tokenizer and the real FAISS index of the demo model: through
`plan()` (fast), and end to end through a served model and an upstream server (slow)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from pattern_store.embedder import Embedder
from pattern_store.store import PatternStore
from server.config import ServerConfig
from server.errors import ContextTooLong, InvalidRequest, ModelNotFound, PatternNotFound
from server.metrics import Metrics
from server.model_info import ModelInfo, template_ids
from server.plan import Ask, Plan, Sampling, plan
from server.resolver import Resolver
from server.routing import Router

from conftest import DEMO_MOE
from server_harness import RunningServer, copy_demo_store, running_server

slow = pytest.mark.slow

TOKENIZING = ("apply_chat_template", "encode", "_encode_plus")
"""The tokenizer's methods a request's tokens come from: the chat template, `encode`, and `_encode_plus`,
which `tokenizer(text)` and a tokenizing chat template both run (transformers 5's `TokenizersBackend`)."""

SORT = [{"role": "user", "content": "Please sort: 9, 2, 5"}]
UPPER = "Make this uppercase: hello happy"


def counting(monkeypatch: pytest.MonkeyPatch, target: Any, names: tuple[str, ...]) -> list[str]:
    """The names of `target`'s methods `names` in the order they are called from now on (the real methods
    still run: the object is wrapped, not replaced)."""
    calls: list[str] = []

    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(*args, **kwargs)

        return call

    for name in names:
        monkeypatch.setattr(target, name, counted(name, getattr(target, name)))
    return calls


def searches(monkeypatch: pytest.MonkeyPatch, store: PatternStore) -> list[str]:
    """The searches of `store`'s FAISS example index from now on."""
    index = store._example_index._index  # the faiss index itself: what a search costs
    assert index is not None and index.ntotal > 0
    return counting(monkeypatch, index, ("search",))


# -- through plan(): what `taskmoe serve` and the Ray ingress both run ---------------------------------


@dataclass
class Planning:
    info: ModelInfo
    store: PatternStore
    resolver: Resolver

    def plan(self, model: str, messages: list[dict[str, str]] = SORT, **sampling: Any) -> Plan:
        """Plan a chat request; `sort` is an upstream's."""
        users = [m["content"] for m in messages if m["role"] == "user"]
        ask = Ask("chat", model, None, Sampling(**sampling), tuple(messages), query=users[-1])
        return plan(ask, self.info, self.resolver, max_n=16, upstream=("sort",))


@pytest.fixture(scope="module")
def planning(tmp_path_factory) -> Planning:
    info = ModelInfo.load(DEMO_MOE)
    store = PatternStore(copy_demo_store(tmp_path_factory.mktemp("plan")), create=False)
    router = Router(store, Embedder())
    yield Planning(info, store, Resolver(info.name, store, router, Metrics()))
    router.close()


@pytest.fixture()
def plan_tokenized(planning, monkeypatch) -> list[str]:
    return counting(monkeypatch, planning.info.tokenizer, TOKENIZING)


@pytest.mark.parametrize(
    ("model", "sampling", "messages", "refusal"),
    [
        ("gpt-4", {}, SORT, ModelNotFound),
        ("demo-moe@nope", {}, SORT, PatternNotFound),
        ("demo-moe@upper+nope", {}, SORT, PatternNotFound),
        ("demo-moe@", {}, SORT, InvalidRequest),
        ("demo-moe@upper", {"n": 17}, SORT, InvalidRequest),
        ("demo-moe", {}, [{"role": "user", "content": "x" * 20_000}], ContextTooLong),
    ],
)
def test_plan_refuses_before_it_tokenizes(planning, plan_tokenized, model, sampling, messages, refusal) -> None:
    with pytest.raises(refusal):
        planning.plan(model, messages, **sampling)
    assert plan_tokenized == []


@pytest.mark.parametrize("model", ["demo-moe@sort", "demo-moe"])
def test_plan_leaves_an_upstreams_request_untokenized_and_searches_nothing(
    planning, plan_tokenized, monkeypatch, model
) -> None:
    searched = searches(monkeypatch, planning.store)
    planned = planning.plan(model)
    assert planned.upstream and planned.choice.label == "sort" and planned.prompts == ()
    assert plan_tokenized == [] and searched == []


def test_plan_tokenizes_what_it_serves_and_explain_searches(planning, plan_tokenized, monkeypatch) -> None:
    """The counters' control: a request served here is tokenized (as the template gives it), and `/v1/route`'s
    `explain` searches the example index once."""
    messages = [{"role": "user", "content": UPPER}]
    planned = planning.plan("demo-moe", messages, max_tokens=4)
    assert planned.choice.label == "upper" and not planned.upstream
    assert planned.prompts == (tuple(template_ids(planning.info.tokenizer, messages)),)
    assert plan_tokenized.count("apply_chat_template") == 2, plan_tokenized  # the plan's, and the reference's
    searched = searches(monkeypatch, planning.store)
    explained = planning.resolver.explain("demo-moe", None, UPPER)
    assert searched == ["search"] and explained.label == "upper"
    assert any(candidate.similarity is not None for candidate in explained.decision.candidates)
    assert all(candidate.similarity is None for candidate in planned.choice.decision.candidates)


# -- end to end: a served model, and an upstream server for `sort` ---------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> RunningServer:
    config = ServerConfig(model=DEMO_MOE, store=copy_demo_store(tmp_path_factory.mktemp("upstream")), workers=2)
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def front(tmp_path_factory, upstream) -> RunningServer:
    """Serves every pattern itself but `sort`, which the upstream server answers."""
    store = copy_demo_store(tmp_path_factory.mktemp("front"))
    config = ServerConfig(model=DEMO_MOE, store=store, upstream=(f"sort={upstream.url}/v1#demo-moe@sort",), workers=2)
    with running_server(config) as running:
        yield running


@pytest.fixture()
def client(front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def tokenized(front, monkeypatch) -> list[str]:
    """The front server's tokenizer calls during the test."""
    return counting(monkeypatch, front.runtime.info.tokenizer, TOKENIZING)


@slow
def test_a_served_request_is_tokenized_where_the_counter_sees_it(client, tokenized) -> None:
    """The counter's control: a request the front serves itself is tokenized, and counted."""
    reply = client.chat.completions.create(
        model="demo-moe@upper", messages=[{"role": "user", "content": UPPER}], temperature=0, max_tokens=24
    )
    assert reply.choices[0].message.content == "HELLO HAPPY"
    assert "apply_chat_template" in tokenized and "_encode_plus" in tokenized, tokenized
    tokenized.clear()
    completion = client.completions.create(model="demo-moe@upper", prompt=UPPER, max_tokens=2)
    assert completion.choices[0].text and tokenized, tokenized


@slow
@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"model": "gpt-4"}, "model_not_found", "model 'gpt-4' does not exist; this server serves 'demo-moe'"),
        ({"model": "demo-moe@nope"}, "pattern_not_found", "pattern 'nope' does not exist; stored patterns: arith"),
        ({"model": "demo-moe", "extra_body": {"pattern": "nope"}}, "pattern_not_found", "pattern 'nope' does not"),
        ({"model": "demo-moe@sort+nope"}, "pattern_not_found", "pattern 'nope' does not exist"),
    ],
)
def test_a_404_for_an_unknown_model_or_pattern_is_answered_untokenized(
    client, tokenized, fields, code, message
) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(messages=SORT, **fields)
    error = refused.value.body
    assert error["code"] == code and error["message"].startswith(message), error
    assert tokenized == []


@slow
@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/chat/completions", {"logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias is not supported"),
        ("/chat/completions", {"tools": [{"type": "function"}]}, "tools", "tools (function calling) are not"),
        ("/chat/completions", {"logprobs": True}, "logprobs", "logprobs are not supported"),
        ("/chat/completions", {"presence_penalty": 1}, "presence_penalty", "presence_penalty and frequency"),
        ("/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "only the 'text'"),
        ("/chat/completions", {"n": 17}, "n", "n is at most 16"),
        ("/chat/completions", {"max_tokens": 0}, "max_tokens", "invalid value for 'max_tokens'"),
        ("/chat/completions", {"temperature": 3}, "temperature", "invalid value for 'temperature'"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 20_000}]}, "messages", "messages of"),
        ("/completions", {"prompt": "Sort: 3, 1", "echo": True}, "echo", "echo is not supported"),
        ("/completions", {"prompt": "Sort: 3, 1", "best_of": 3}, "best_of", "best_of is not supported"),
    ],
)
@pytest.mark.parametrize("model", ["demo-moe", "demo-moe@upper", "demo-moe@sort"])
def test_a_400_for_an_unsupported_field_or_a_bad_value_is_answered_untokenized(
    front, upstream, tokenized, path, body, param, message, model
) -> None:
    """Routed, named, or named for the upstream: refused by the front, neither tokenized nor forwarded."""
    forwarded_before = upstream.metric("taskmoe_requests_total", f'route="/v1{path}",status="400"')
    sent = {"model": model, "messages": SORT} if path == "/chat/completions" else {"model": model}
    response = httpx.post(f"{front.url}/v1{path}", json=sent | body, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and error["message"].startswith(message), error
    assert tokenized == []
    assert upstream.metric("taskmoe_requests_total", f'route="/v1{path}",status="400"') == forwarded_before


@slow
@pytest.mark.parametrize("model", ["demo-moe@sort", "demo-moe"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_forwarded_request_is_not_tokenized_by_the_front(
    client, upstream, tokenized, monkeypatch, model, stream
) -> None:
    """Named or routed to `sort`, streamed or not: the upstream tokenizes and answers; the front only routes."""
    upstream_tokenized = counting(monkeypatch, upstream.runtime.info.tokenizer, TOKENIZING)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=SORT, temperature=0, stream=stream)
    reply = raw.parse()
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else None
    assert raw.headers["x-taskmoe-pattern"] == "sort" and raw.headers["x-taskmoe-upstream"].startswith(upstream.url)
    assert (text if stream else reply.choices[0].message.content) == "2, 5, 9"
    assert tokenized == []
    assert "apply_chat_template" in upstream_tokenized, "the upstream answered without tokenizing?"


# -- the example index ---------------------------------------------------------------------------------


@pytest.fixture()
def searched(front, monkeypatch) -> list[str]:
    """The front server's searches of its FAISS example index during the test."""
    return searches(monkeypatch, front.runtime.store)


def nearest_similarities(front: RunningServer, text: str) -> dict[str, float]:
    """Reference: per pattern, the best cosine among the query's k nearest examples, by brute force."""
    examples = front.runtime.store.examples()
    query = np.asarray(front.runtime.router.embedder.embed([text]), dtype=np.float32)[0]
    similarity = examples.vectors @ query
    best: dict[str, float] = {}
    for i in np.argsort(-similarity)[: front.runtime.router.k]:
        owner = examples.owners[i]
        best[owner] = max(best.get(owner, -1.0), float(similarity[i]))
    return best


@slow
def test_a_routed_completion_does_not_search_the_example_index(client, front, searched) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="demo-moe", messages=[{"role": "user", "content": UPPER}], temperature=0, max_tokens=24
    )
    assert raw.headers["x-taskmoe-pattern"] == "upper" and raw.parse().choices[0].message.content == "HELLO HAPPY"
    client.completions.create(model="demo-moe", prompt=UPPER, max_tokens=2)
    assert searched == []


@slow
def test_the_route_endpoint_still_reports_each_candidates_nearest_similarity(front, searched) -> None:
    routed = httpx.post(f"{front.url}/v1/route", json={"messages": [{"role": "user", "content": UPPER}]}, timeout=60)
    assert routed.status_code == 200 and routed.json()["pattern"] == "upper", routed.text
    assert searched == ["search"]
    reported = {c["pattern"]: c["similarity"] for c in routed.json()["candidates"] if c["similarity"] is not None}
    expected = nearest_similarities(front, UPPER)
    assert reported.keys() == expected.keys() and "upper" in reported, (reported, expected)
    for pattern, similarity in expected.items():
        assert reported[pattern] == pytest.approx(similarity, abs=1e-3), json.dumps(routed.json())
