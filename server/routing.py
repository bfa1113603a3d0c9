"""Query -> pattern: embed the query, compare it with the stored patterns' example prompts, or fall back.

Three rules, measured on real benchmark prompts by `scripts/eval_routing.py` (README, "Routing"):

- `classifier` (the default, best measured): a multinomial logistic regression on the example
  embeddings, relearnt whenever the store changes (a fraction of a second for thousands of examples);
- `centroid`: the pattern whose mean example embedding is nearest;
- `knn`: the k nearest examples vote, weighted by their similarity.

Whatever the rule, a query whose nearest example is less similar than `threshold` looks like no stored
task and is served by the fallback (None: the full model).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pattern_store.embedder import Embedder
from pattern_store.recipes import ROUTE_RULES
from pattern_store.store import PatternStore, SearchHit

RULES = ROUTE_RULES
log = logging.getLogger("taskmoe.routing")


@dataclass(frozen=True)
class RouteDecision:
    pattern: str | None  # None: the full model
    score: float  # the nearest example's similarity to the query
    reason: str  # "classifier", "centroid", "knn", "below-threshold" or "empty-store"
    hits: tuple[SearchHit, ...]


def fit_linear_classifier(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3) -> torch.nn.Linear:
    """Softmax regression fitted with L-BFGS from zero weights: the problem is convex, so the result is
    deterministic without touching the global random state (which generation's sampling uses)."""
    model = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + l2 * model.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return model.requires_grad_(False)


@dataclass
class _Learnt:
    version: int
    names: list[str]
    centroids: torch.Tensor  # [patterns, d], unit rows
    classifier: torch.nn.Linear | None


class Router:
    def __init__(
        self,
        store: PatternStore,
        embedder: Embedder,
        rule: str = "classifier",
        k: int = 10,
        threshold: float = 0.3,
        fallback: str | None = None,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown routing rule {rule!r}; expected one of {', '.join(RULES)}")
        if k < 1:
            raise ValueError("k must be at least 1")
        self.store, self.embedder, self.rule = store, embedder, rule
        self.k, self.threshold, self.fallback = k, threshold, fallback
        self._learnt: _Learnt | None = None
        self._lock = threading.Lock()

    def route(self, text: str) -> RouteDecision:
        return self.route_vector(self.embedder.embed([text])[0])

    def route_vector(self, vector: torch.Tensor) -> RouteDecision:
        hits = tuple(self.store.search(vector, k=self.k))
        if not hits:
            return RouteDecision(self.fallback, 0.0, "empty-store", ())
        nearest = hits[0].score
        if nearest < self.threshold:
            return RouteDecision(self.fallback, nearest, "below-threshold", hits)
        if self.rule == "knn":
            return RouteDecision(max(hits, key=lambda h: (h.total, h.score)).name, nearest, "knn", hits)
        learnt = self._learn()
        query = torch.as_tensor(np.asarray(vector, dtype=np.float32)).reshape(1, -1)
        if self.rule == "centroid" or learnt.classifier is None:
            choice = int((query @ learnt.centroids.T).argmax())
            return RouteDecision(learnt.names[choice], nearest, "centroid", hits)
        choice = int(learnt.classifier(query).argmax())
        return RouteDecision(learnt.names[choice], nearest, "classifier", hits)

    @staticmethod
    def _fit(x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.nn.Linear | None:
        """The classifier, or None (routing by centroid, which cannot fail) when fitting fails or gives
        non-finite weights: one bad pattern must not take routing down for all the others."""
        try:
            classifier = fit_linear_classifier(x, y, len(names))
        except Exception:
            log.exception("routing: fitting the classifier on %d examples failed; routing by centroid", len(y))
            return None
        if not all(bool(torch.isfinite(p).all()) for p in classifier.parameters()):
            log.error("routing: the classifier fitted on %d examples is not finite; routing by centroid", len(y))
            return None
        return classifier

    def _learn(self) -> _Learnt:
        """Centroids and classifier of the store as it is now; relearnt only when the store changed."""
        with self._lock:
            version, vectors, owners = self.store.examples()
            if self._learnt is not None and self._learnt.version == version:
                return self._learnt
            names = sorted(set(owners))
            x = torch.from_numpy(np.ascontiguousarray(vectors))
            y = torch.tensor([names.index(owner) for owner in owners])
            centroids = torch.nn.functional.normalize(
                torch.stack([x[y == i].mean(0) for i in range(len(names))]), dim=1
            )
            classifier = self._fit(x, y, names) if len(names) > 1 else None
            self._learnt = _Learnt(version, names, centroids, classifier)
            return self._learnt
