"""Query -> pattern(s): a calibrated probability per stored pattern, a union when two are close, and the
fallback when the query looks like no stored task.

A wrong route is worse than no route: a query served by another task's variant lacks the experts it
needs, while the fallback (the full model, or a general pattern) only costs memory. So a decision is made
in three steps, each measured on real benchmark prompts by `scripts/eval_routing.py` (README, "Routing"):

1. **Probabilities.** A rule scores the query's features (`server.route_features`: its embedding and its
   character n-grams) against each pattern: `classifier` (the default, a softmax regression on the
   patterns' example prompts) or `centroid` (cosine to each pattern's mean example). The scores become
   probabilities through a temperature fitted on the examples themselves, cross-validated (each example
   scored by a rule that never saw it), so that "0.9" means right nine times in ten on such queries.
2. **Confidence or union.** The most probable pattern serves when its probability reaches `threshold`.
   Otherwise the smallest set of the top `union` patterns whose probabilities sum to `threshold` serves
   together (the union of their experts or channels); failing that, the fallback.
3. **Out of store.** Probabilities only compare stored tasks: a query of a task with no pattern still gets
   them. Each pattern's typical form is the mean form n-gram vector of its examples; a query whose form is
   less like the chosen pattern's than every held-out example of that pattern was (its *typicality*, a
   conformal p-value, below `novelty`) goes to the fallback.

Everything is learnt again when the store changes (a second or two for thousands of examples).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pattern_store.embedder import Embedder
from pattern_store.store import PatternStore, SearchHit
from server.config import RoutingPolicy
from server.route_features import RouteFeatures

UNION_SEPARATOR = "+"
CROSS_VALIDATION_FOLDS = 5
log = logging.getLogger("taskmoe.routing")


@dataclass(frozen=True)
class Candidate:
    """A stored pattern as the router saw it for one query."""

    pattern: str
    probability: float  # calibrated, among the stored patterns
    typicality: float  # share of the pattern's held-out examples whose form is less like it than the query's
    similarity: float | None  # cosine of the query's embedding to the pattern's nearest example, if among the k


@dataclass(frozen=True)
class RouteDecision:
    """Which patterns serve a query: one, a union of several, or none (the fallback)."""

    patterns: tuple[str, ...]  # () : the fallback
    probability: float  # calibrated probability that the query's task is among `patterns` (or the top one's)
    reason: str  # the rule ("classifier", "centroid"), "union", "below-threshold", "out-of-store", "empty-store"
    candidates: tuple[Candidate, ...] = ()
    fallback: str | None = None  # the pattern that serves when `patterns` is empty (None: the full model)
    typicality: float | None = None

    @property
    def pattern(self) -> str | None:
        """What serves: `a`, a union `a+b`, or the fallback (None: the full model)."""
        return UNION_SEPARATOR.join(self.patterns) if self.patterns else self.fallback


def fit_linear_classifier(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-4) -> torch.nn.Linear:
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


def centroid_scorer(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    """Cosine similarity to each class's mean example, as a linear layer (a class without examples scores 0)."""
    scorer = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        means = torch.zeros(classes, x.shape[1]).index_add_(0, y, x)
        scorer.weight.copy_(torch.nn.functional.normalize(means, dim=1))
        scorer.bias.zero_()
    return scorer.requires_grad_(False)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that makes softmax(logits / T) best predict `labels` (negative log-likelihood)."""
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return min(max(temperature, 1e-3), 1e3) if np.isfinite(temperature) else 1.0


def stratified_folds(labels: torch.Tensor, folds: int) -> torch.Tensor:
    """A fold number per example, each class spread evenly over the folds (a fixed shuffle, no global RNG)."""
    generator = torch.Generator().manual_seed(0)
    assignment = torch.empty_like(labels)
    for label in labels.unique():
        members = (labels == label).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=generator)]
        assignment[members] = torch.arange(len(members)) % folds
    return assignment


@dataclass
class LearntRouter:
    """The router of one store revision: its scorer, temperature and each pattern's typical form."""

    version: int
    names: list[str]
    rule: str
    scorer: torch.nn.Linear | None  # None: a single pattern (its probability is 1)
    temperature: float
    form_centroids: torch.Tensor  # [patterns, form buckets], unit rows
    held_out_form: list[torch.Tensor] = field(default_factory=list)  # per pattern, sorted held-out similarities

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        if self.scorer is None:
            return torch.ones(len(features), 1)
        return torch.softmax(self.scorer(features) / self.temperature, dim=-1)

    def typicality(self, form: torch.Tensor) -> torch.Tensor:
        """[queries, patterns]: (1 + held-out examples at most as similar) / (1 + held-out examples)."""
        similarity = form @ self.form_centroids.T
        out = torch.ones_like(similarity)
        for j, held in enumerate(self.held_out_form):
            if len(held):
                below = torch.searchsorted(held, similarity[:, j].contiguous(), right=True)
                out[:, j] = (below + 1).float() / (len(held) + 1)
        return out


class Router:
    def __init__(
        self,
        store: PatternStore,
        embedder: Embedder,
        policy: RoutingPolicy | None = None,
        fallback: str | None = None,
        features: RouteFeatures | None = None,
        **overrides: Any,
    ) -> None:
        """`policy`: the routing settings (default: `RoutingPolicy()`'s, the server's); `overrides` replace some
        of them (`threshold=0.5`), validated as the policy validates them."""
        policy = RoutingPolicy(**((policy or RoutingPolicy()).model_dump() | overrides))
        self.store, self.embedder, self.policy, self.fallback = store, embedder, policy, fallback
        self.rule, self.k, self.threshold = policy.rule, policy.neighbours, policy.threshold
        self.union, self.novelty = policy.union, policy.novelty
        self.features = features or RouteFeatures()
        self._learnt: LearntRouter | None = None
        self._lock = threading.Lock()

    # -- deciding ------------------------------------------------------------------------------

    def route(self, text: str) -> RouteDecision:
        return self.route_embedded([text], self.embedder.embed([text]))[0]

    def route_embedded(self, texts: Sequence[str], vectors: torch.Tensor | np.ndarray) -> list[RouteDecision]:
        """Decisions for queries whose embeddings are already known (batch evaluation embeds once)."""
        vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32)).reshape(len(texts), -1)
        learnt = self.learn()
        if learnt is None:
            return [RouteDecision((), 0.0, "empty-store", fallback=self.fallback) for _ in texts]
        features = self.features.transform(texts, vectors)
        probabilities = learnt.probabilities(features)
        typicality = learnt.typicality(self.features.form_block(features))
        return [
            self._decide(learnt, probabilities[i], typicality[i], self.store.search(vectors[i], k=self.k))
            for i in range(len(texts))
        ]

    def _decide(
        self, learnt: LearntRouter, probabilities: torch.Tensor, typicality: torch.Tensor, hits: list[SearchHit]
    ) -> RouteDecision:
        nearest = {hit.name: hit.score for hit in hits}
        order = probabilities.argsort(descending=True).tolist()
        candidates = tuple(
            Candidate(learnt.names[j], float(probabilities[j]), float(typicality[j]), nearest.get(learnt.names[j]))
            for j in order
        )
        chosen: list[int] = []
        mass = 0.0
        for j in order[: self.union]:
            chosen.append(j)
            mass += float(probabilities[j])
            if mass >= self.threshold:
                break
        typical = max(float(typicality[j]) for j in chosen)

        def fallback(reason: str) -> RouteDecision:
            return RouteDecision((), float(probabilities[order[0]]), reason, candidates, self.fallback, typical)

        if mass < self.threshold:
            return fallback("below-threshold")
        if typical < self.novelty:
            return fallback("out-of-store")
        names = tuple(sorted(learnt.names[j] for j in chosen))
        return RouteDecision(names, mass, "union" if len(chosen) > 1 else learnt.rule, candidates, typicality=typical)

    # -- learning ------------------------------------------------------------------------------

    def learn(self) -> LearntRouter | None:
        """The router of the store as it is now (None: nothing routable); learnt again only when the store
        changed. The store's watcher calls it after a reload, so that requests rarely wait for it."""
        with self._lock:
            if self._learnt is not None and self._learnt.version == self.store.version:
                return self._learnt  # every request: checked without reading the examples
            examples = self.store.examples()
            if not examples.owners:
                self._learnt = None  # relearnt when a routable pattern arrives (the version changes)
                return None
            names = sorted(set(examples.owners))
            x = self.features.transform(examples.texts, examples.vectors)
            y = torch.tensor([names.index(owner) for owner in examples.owners])
            self._learnt = self._fit(examples.version, names, x, y)
            return self._learnt

    def _scorer(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[str, torch.nn.Linear]:
        """The rule's scorer; a classifier that cannot be fitted (or is not finite) gives way to centroids,
        which cannot fail: one bad pattern must not take routing down for all the others."""
        if self.rule == "classifier":
            try:
                classifier = fit_linear_classifier(x, y, classes)
                if all(bool(torch.isfinite(p).all()) for p in classifier.parameters()):
                    return "classifier", classifier
                log.error("routing: the classifier fitted on %d examples is not finite; routing by centroid", len(y))
            except Exception:
                log.exception("routing: fitting the classifier on %d examples failed; routing by centroid", len(y))
        return "centroid", centroid_scorer(x, y, classes)

    def _fit(self, version: int, names: list[str], x: torch.Tensor, y: torch.Tensor) -> LearntRouter:
        classes = len(names)
        form = self.features.form_block(x)
        rule, scorer = self._scorer(x, y, classes) if classes > 1 else (self.rule, None)
        centroids = torch.nn.functional.normalize(torch.zeros(classes, form.shape[1]).index_add_(0, y, form), dim=1)
        learnt = LearntRouter(version, names, rule, scorer, 1.0, centroids, [torch.empty(0)] * classes)
        folds = min(CROSS_VALIDATION_FOLDS, int(torch.bincount(y).max()))
        if folds < 2:
            return learnt  # one example per pattern: nothing held out to calibrate on
        fold_of = stratified_folds(y, folds)
        logits = torch.zeros(len(y), classes)
        seen = torch.zeros(len(y), dtype=torch.bool)  # the example's pattern was in the training folds
        similarity = torch.zeros(len(y))
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            if classes > 1:
                logits[test] = self._scorer(x[train], y[train], classes)[1](x[test])
            seen[test] = (torch.bincount(y[train], minlength=classes) > 0)[y[test]]
            fold_centroids = torch.zeros(classes, form.shape[1]).index_add_(0, y[train], form[train])
            fold_centroids = torch.nn.functional.normalize(fold_centroids, dim=1)
            similarity[test] = (form[test] * fold_centroids[y[test]]).sum(1)
        if classes > 1:
            learnt.temperature = fit_temperature(logits[seen], y[seen])
        learnt.held_out_form = [similarity[(y == j) & seen].sort().values for j in range(classes)]
        log.info(
            "routing: learnt %d patterns from %d examples (%s, temperature %.3g, %d-fold)",
            classes,
            len(y),
            rule,
            learnt.temperature,
            folds,
        )
        return learnt
