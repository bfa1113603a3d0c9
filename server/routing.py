"""Query -> pattern: embed the query, search the store's example prompts, vote, or fall back.

The k nearest example prompts vote for their patterns, each vote weighted by its cosine similarity.
The winner serves the query unless its best similarity is below `threshold` (the query looks like no
stored task), in which case the configured fallback serves it (None: the full model).
"""

from __future__ import annotations

from dataclasses import dataclass

from pattern_store.embedder import Embedder
from pattern_store.store import PatternStore, SearchHit


@dataclass(frozen=True)
class RouteDecision:
    pattern: str | None  # None: the full model
    score: float  # the chosen pattern's best similarity (0 when nothing matched)
    reason: str  # "nearest", "below-threshold" or "empty-store"
    hits: tuple[SearchHit, ...]


class Router:
    def __init__(
        self,
        store: PatternStore,
        embedder: Embedder,
        k: int = 10,
        threshold: float = 0.3,
        fallback: str | None = None,
    ) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.store, self.embedder, self.k, self.threshold, self.fallback = store, embedder, k, threshold, fallback

    def route(self, text: str) -> RouteDecision:
        hits = self.store.search(self.embedder.embed([text])[0], k=self.k)
        return self.decide(hits)

    def decide(self, hits: list[SearchHit]) -> RouteDecision:
        if not hits:
            return RouteDecision(self.fallback, 0.0, "empty-store", ())
        winner = max(hits, key=lambda hit: (hit.total, hit.score))
        if winner.score < self.threshold:
            return RouteDecision(self.fallback, winner.score, "below-threshold", tuple(hits))
        return RouteDecision(winner.name, winner.score, "nearest", tuple(hits))
