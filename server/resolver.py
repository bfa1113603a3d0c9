"""Which patterns serve a request: the one it names (`MODEL@PATTERN`, the `pattern` field, a union `a+b`,
`full`), or, when it names none, the router's choice for its query (and, when that choice's patterns leave
the store before it is leased, the fallback: `store_changed`). The answer is a `Choice`; a union is a
tuple of names from here to the lease, never a string to split again."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pattern_store.store import PatternStore
from server.config import FULL_MODEL
from server.errors import InvalidRequest, ModelNotFound, PatternDamaged, PatternNotFound, shown
from server.metrics import Metrics
from server.routing import UNION_SEPARATOR, RouteDecision, Router

EXPLICIT = "explicit"
STORE_CHANGED = "store-changed"
"""How a routed request is served whose patterns left the store between routing and leasing: by the fallback."""

MAX_ROUTED_CHARACTERS = 16_384
"""Routing embeds the start of a query only: its embedder truncates at a few hundred tokens anyway, and
tokenizing megabytes to throw them away would be a denial of service."""


@dataclass(frozen=True)
class Choice:
    """The stored patterns that serve a request (several: their union; none: the full model) and why."""

    patterns: tuple[str, ...]
    how: str  # "explicit", or the router's reason ("classifier", "union", "below-threshold", ...)
    probability: float | None = None  # the router's calibrated probability for its choice
    decision: RouteDecision | None = None
    replaced: str | None = None  # STORE_CHANGED: the label the router chose, whose patterns left the store

    @property
    def label(self) -> str:
        """How the choice is named to clients: `a`, `a+b`, or `full`."""
        return UNION_SEPARATOR.join(self.patterns) or FULL_MODEL

    @property
    def route_header(self) -> str:
        """`x-taskmoe-route`: how the pattern was chosen and, when routed, the router's probability."""
        if self.replaced is not None:
            return f"{self.how}; was={self.replaced}"
        return self.how if self.probability is None else f"{self.how}; p={self.probability:.3f}"

    @property
    def routed(self) -> bool:
        """Chosen by the router (a request that named no pattern)."""
        return self.how != EXPLICIT

    def served_id(self, model_name: str) -> str:
        """The `model` field of a response: which variant answered."""
        return f"{model_name}@{self.label}" if self.patterns else model_name


def model_ids(model_name: str, patterns: Iterable[str]) -> list[str]:
    """`GET /v1/models`: the model (routed) and `MODEL@PATTERN` for every stored pattern."""
    return [model_name, *(f"{model_name}@{name}" for name in patterns)]


def explicit_choice(model: str, pattern: str | None, model_name: str, store: PatternStore) -> Choice | None:
    """The patterns a request names (`MODEL@PATTERN` or the `pattern` field; `full`: the full model; `a+b`:
    the union of patterns a and b), or None when it names none and must be routed. Unknown models and
    patterns are errors."""
    name, at, suffix = model.partition("@")
    if at and not suffix:
        raise InvalidRequest(f"model {shown(model)} names no pattern after '@'", param="model")
    if name != model_name:
        raise ModelNotFound(
            f"model {shown(model)} does not exist; this server serves {model_name!r} (see /v1/models)", param="model"
        )
    if suffix and pattern and suffix != pattern:
        raise InvalidRequest(
            f"model names pattern {shown(suffix)} but the pattern field says {shown(pattern)}", param="pattern"
        )
    explicit = suffix or pattern
    if not explicit:
        return None
    names = sorted(set(explicit.split(UNION_SEPARATOR)))
    param = "model" if suffix else "pattern"
    if "" in names:
        raise InvalidRequest(f"{shown(explicit)} names an empty pattern; a union is PATTERN+PATTERN", param=param)
    for name in names:
        if name != FULL_MODEL:
            check_stored(store, name, param)
    if FULL_MODEL in names:  # the full model holds every expert: its union with anything is itself
        return Choice((), EXPLICIT)
    return Choice(tuple(names), EXPLICIT)


def check_stored(store: PatternStore, name: str, param: str | None = None) -> None:
    """Raise unless pattern `name` is stored: `PatternDamaged` when its files are there but cannot be read,
    else `PatternNotFound`. The store is looked at on disk first (another process may have just written it)."""
    if name in store:
        return
    store.refresh_if_changed()
    if name in store:
        return
    problem = store.problem(name)
    if problem is not None:
        raise PatternDamaged(f"pattern {shown(name)} is damaged: {problem}", param=param, retry_after=60)
    known = ", ".join(store.names()) or "none"
    raise PatternNotFound(f"pattern {shown(name)} does not exist; stored patterns: {known}", param=param)


def store_changed(choice: Choice, store: PatternStore, fallback: str | None) -> Choice:
    """What serves a routed request whose patterns left the store before it was leased: the fallback
    pattern while it is stored, else the full model. The client never named the patterns that left, so it
    gets an answer, and `x-taskmoe-route` says what happened."""
    names = (fallback,) if fallback is not None and fallback in store else ()
    return Choice(names, STORE_CHANGED, replaced=choice.label)


class Resolver:
    """Request -> `Choice`, for one served model and its pattern store."""

    def __init__(self, model_name: str, store: PatternStore, router: Router, metrics: Metrics) -> None:
        self.model_name, self.store, self.router, self.metrics = model_name, store, router, metrics

    def model_ids(self) -> list[str]:
        return model_ids(self.model_name, self.store.names())

    def named(self, model: str, pattern: str | None) -> Choice | None:
        """The choice the request names, checked (cheap: no routing); None when it must be routed."""
        return explicit_choice(model, pattern, self.model_name, self.store)

    def route(self, query: str, similarity: bool = False, record: bool = False) -> Choice:
        """The router's choice for a query (an embedding: the costly step of resolving). `similarity`: also
        each candidate's similarity to its nearest example (a search of the example index that no decision
        needs: only `explain`'s callers report it). `record`: served traffic, which a fallback record keeps
        when it goes to the fallback."""
        with self.metrics.route_seconds.time():
            decision = self.router.route(query[:MAX_ROUTED_CHARACTERS], similarity, record)
        names = decision.patterns or ((decision.fallback,) if decision.fallback else ())
        choice = Choice(names, decision.reason, decision.probability, decision)
        self.metrics.routes.labels(choice.label, decision.reason).inc()
        return choice

    def store_changed(self, choice: Choice) -> Choice:
        """The choice that replaces a routed one whose patterns left the store (`store_changed`), counted."""
        replacement = store_changed(choice, self.store, self.router.fallback)
        self.metrics.store_changed_routes.inc()
        self.metrics.routes.labels(replacement.label, STORE_CHANGED).inc()
        return replacement

    def resolve(self, model: str, pattern: str | None, query: str) -> Choice:
        """The named choice or, without one, the routed one: what serves a completion."""
        return self.named(model, pattern) or self.route(query, record=True)

    def explain(self, model: str, pattern: str | None, query: str) -> Choice:
        """`resolve`'s choice with all the router saw, each candidate's nearest-example similarity too: what
        `/v1/route` reports."""
        return self.named(model, pattern) or self.route(query, similarity=True)
