"""Which patterns serve a request: the one it names (`MODEL@PATTERN`, the `pattern` field, a union `a+b`,
`full`), or, when it names none, the router's choice for its query. The answer is a `Choice`; a union is a
tuple of names from here to the lease, never a string to split again."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pattern_store.store import PatternStore
from server.config import FULL_MODEL
from server.errors import InvalidRequest, ModelNotFound, PatternNotFound
from server.metrics import Metrics
from server.routing import UNION_SEPARATOR, RouteDecision, Router

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

    @property
    def label(self) -> str:
        """How the choice is named to clients: `a`, `a+b`, or `full`."""
        return UNION_SEPARATOR.join(self.patterns) or FULL_MODEL

    @property
    def route_header(self) -> str:
        """`x-taskmoe-route`: how the pattern was chosen and, when routed, the router's probability."""
        return self.how if self.probability is None else f"{self.how}; p={self.probability:.3f}"

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
        raise InvalidRequest(f"model {model!r} names no pattern after '@'", param="model")
    if name != model_name:
        raise ModelNotFound(
            f"model {model!r} does not exist; this server serves {model_name!r} (see /v1/models)", param="model"
        )
    if suffix and pattern and suffix != pattern:
        raise InvalidRequest(f"model names pattern {suffix!r} but the pattern field says {pattern!r}", param="pattern")
    explicit = suffix or pattern
    if not explicit:
        return None
    if explicit == FULL_MODEL:
        return Choice((), "explicit")
    names = sorted(set(explicit.split(UNION_SEPARATOR)))
    param = "model" if suffix else "pattern"
    if "" in names:
        raise InvalidRequest(f"{explicit!r} names an empty pattern; a union is PATTERN+PATTERN", param=param)
    for name in names:
        if name not in store:
            raise PatternNotFound(
                f"pattern {name!r} does not exist; stored patterns: {', '.join(store.names()) or 'none'}", param=param
            )
    return Choice(tuple(names), "explicit")


class Resolver:
    """Request -> `Choice`, for one served model and its pattern store."""

    def __init__(self, model_name: str, store: PatternStore, router: Router, metrics: Metrics) -> None:
        self.model_name, self.store, self.router, self.metrics = model_name, store, router, metrics

    def model_ids(self) -> list[str]:
        return model_ids(self.model_name, self.store.names())

    def named(self, model: str, pattern: str | None) -> Choice | None:
        """The choice the request names, checked (cheap: no routing); None when it must be routed."""
        return explicit_choice(model, pattern, self.model_name, self.store)

    def route(self, query: str) -> Choice:
        """The router's choice for a query (an embedding: the costly step of resolving)."""
        with self.metrics.route_seconds.time():
            decision = self.router.route(query[:MAX_ROUTED_CHARACTERS])
        names = decision.patterns or ((decision.fallback,) if decision.fallback else ())
        choice = Choice(names, decision.reason, decision.probability, decision)
        self.metrics.routes.labels(choice.label, decision.reason).inc()
        return choice

    def resolve(self, model: str, pattern: str | None, query: str) -> Choice:
        """The named choice or, without one, the routed one."""
        return self.named(model, pattern) or self.route(query)
