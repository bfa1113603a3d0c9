"""Query -> pattern(s): a calibrated probability per stored pattern, a union when two are close, and the
fallback when the query looks like no stored task.

A wrong route is worse than no route: a query served by another task's variant lacks the experts it
needs, while the fallback (the full model, or a general pattern) only costs memory. So a decision is made
in three steps, each measured on real benchmark prompts by `scripts/eval_routing.py` (docs/benchmarks-routing.md):

1. **Probabilities.** A rule scores the query's features (`server.route_features`: its embedding and its
   character n-grams) against each pattern: `classifier` (the default, scikit-learn's multinomial logistic
   regression on the patterns' example prompts) or `centroid` (cosine to each pattern's mean example). The scores become
   probabilities through a temperature fitted on the examples themselves, cross-validated (each example
   scored by a rule that never saw it), so that "0.9" means right nine times in ten on such queries.
2. **Confidence or union.** The most probable pattern serves when its probability reaches `threshold`.
   Otherwise the smallest set of the top `union` patterns whose probabilities sum to `threshold` serves
   together (the union of their experts or channels); failing that, the fallback.
3. **Out of store.** Probabilities only compare stored tasks: a query of a task with no pattern still gets
   them. Each pattern's typical form is the mean form n-gram vector of its examples; a query whose form is
   less like the chosen pattern's than every held-out example of that pattern was (its *typicality*, a
   conformal p-value, below `novelty`) goes to the fallback.

Before all this, a first stage reads the query's n-grams alone (no embedding, which is 95% of a decision's
time on one CPU thread): a second scorer of the same rule, fitted and calibrated on the n-gram blocks of the
examples, routes the query to its most probable pattern when that probability reaches `ngram_gate` and the
query is typical of the pattern (step 3, which reads n-grams only); every other query is embedded and
decided as above. On `data/tasks` (`scripts/eval_routing.py`) the n-gram stage decides about two queries in
three, and the router that embeds every query (`ngram_gate` 1) serves the same pattern to over 99% of
those. The gate is a calibrated probability, set well above `threshold` because this stage cannot see topic
(ARC and OpenBookQA share a form): 0.99 was chosen on the routing examples' cross-validated probabilities
(the store's own, never the queries): there, 69% of the examples reach it, with one error in 311.

Everything is learnt again when the store changes (a second or two for thousands of examples), in the
background (`server.relearning`): requests go on with the router they have until the new one is ready,
and never with a pattern that has left the store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from pattern_store.embedder import Embedder
from pattern_store.store import Examples, PatternStore, SearchHit
from server.config import RoutingPolicy
from server.fitting_process import FittingProcess
from server.relearning import Relearning
from server.route_features import FeatureWeights, RouteFeatures

UNION_SEPARATOR = "+"
CROSS_VALIDATION_FOLDS = 5
RELEARN_INTERVAL = 5.0
"""Seconds from one background fit's start to the next's: a store that keeps changing costs at most one fit
per interval (on 2 cores saturated by routed load, back-to-back fits slowed the slowest request 1.5-1.6x,
none at all 1.1x: `scripts/bench_store_changes.py`); a change after a quiet spell is learnt at once."""
L2 = 1e-4  # the classifier's penalty on the mean cross-entropy (`SoftmaxRegression`)
log = logging.getLogger("taskmoe.routing")


@dataclass(frozen=True)
class Candidate:
    """A stored pattern as the router saw it for one query."""

    pattern: str
    probability: float  # calibrated, among the stored patterns
    typicality: float  # share of the pattern's held-out examples whose form is less like it than the query's
    similarity: float | None  # cosine of the query's embedding to the pattern's nearest example, if among the k
    # (None for every pattern when the decision was made without the search: `Router.route_embedded`, or
    # by the n-gram stage)


@dataclass(frozen=True)
class RouteDecision:
    """Which patterns serve a query: one, a union of several, or none (the fallback)."""

    patterns: tuple[str, ...]  # () : the fallback
    probability: float  # calibrated probability that the query's task is among `patterns` (or the top one's)
    reason: str  # the rule ("classifier", "centroid"), "union", "below-threshold", "out-of-store", "empty-store",
    # or "store-changed" (every pattern the router knows has left the store; a new one is being learnt)
    candidates: tuple[Candidate, ...] = ()
    fallback: str | None = None  # the pattern that serves when `patterns` is empty (None: the full model)
    typicality: float | None = None
    by_ngrams: bool = False  # decided by the n-gram stage, the query never embedded

    @property
    def pattern(self) -> str | None:
        """What serves: `a`, a union `a+b`, or the fallback (None: the full model)."""
        return UNION_SEPARATOR.join(self.patterns) if self.patterns else self.fallback


class SoftmaxRegression(ClassifierMixin, BaseEstimator):
    """scikit-learn's multinomial logistic regression with its L2 penalty stated on the mean loss: it minimises
    the mean cross-entropy plus `l2 * |W|^2` (W: one weight row per class, the bias free), so that the penalty
    weighs the same against the data in a store of any size, and in a cross-validation fold of it (one C for
    all would penalise a fold's fit on 4/5 of the examples 1.25 times as hard, and the temperature fitted on
    its held-out scores would describe another classifier: on `data/tasks` it moved routing by a point).

    LogisticRegression minimises `C * (sum of the losses) + |w|^2 / 2`: with more than two classes w is W
    (whose rows sum to zero at the optimum either way), so C = 1 / (2 * l2 * examples); with two it is the
    one row W1 - W0 = 2 * W1, so C = 1 / (l2 * examples). lbfgs starts from zero weights and the problem is
    convex: the fit is deterministic without the global random state (which generation's sampling uses).
    """

    def __init__(self, l2: float = L2) -> None:
        self.l2 = l2

    def fit(self, x: np.ndarray, y: np.ndarray) -> SoftmaxRegression:
        scale = 1.0 if len(np.unique(y)) == 2 else 2.0
        self.regression_ = LogisticRegression(C=1.0 / (scale * self.l2 * len(y)), max_iter=200).fit(x, y)
        self.classes_ = self.regression_.classes_
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return self.regression_.decision_function(x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.regression_.predict_proba(x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.regression_.predict(x)


class CentroidClassifier(ClassifierMixin, BaseEstimator):
    """Cosine similarity of a row to each class's mean row: the `centroid` rule, and the typical form that
    out-of-store detection compares to. Nothing to fit but means, so it cannot fail."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> CentroidClassifier:
        self.classes_, index = np.unique(y, return_inverse=True)
        sums = np.eye(len(self.classes_), dtype=x.dtype)[index].T @ x
        self.centroids_ = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x) @ self.centroids_.T

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(x).argmax(axis=1)]


Scorer = SoftmaxRegression | CentroidClassifier


def class_scores(scores: np.ndarray) -> np.ndarray:
    """[n, classes] scores whose softmax is the probabilities (a binary classifier gives one logit, class 1's
    over class 0's)."""
    return np.stack([np.zeros_like(scores), scores], axis=1) if scores.ndim == 1 else scores


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


@dataclass(frozen=True)
class HeldOut:
    """The examples that can be held out (their pattern has another example, so it stays known to the rest)
    and stratified folds over them: as many as the smallest such pattern has examples, up to 5, so that every
    training fold knows every pattern (and scikit-learn has nothing to warn of)."""

    examples: np.ndarray  # indices into the store's examples
    labels: np.ndarray  # their patterns, numbered among the patterns held out (0 .. patterns - 1)
    patterns: np.ndarray  # which of the store's patterns those are
    folds: StratifiedKFold

    @classmethod
    def of(cls, labels: np.ndarray) -> HeldOut | None:
        """None: no pattern has two examples, there is nothing to calibrate on."""
        counts = np.bincount(labels)
        examples = np.flatnonzero(counts[labels] >= 2)
        if not len(examples):
            return None
        patterns, numbered = np.unique(labels[examples], return_inverse=True)
        folds = min(CROSS_VALIDATION_FOLDS, int(counts[patterns].min()))
        return cls(examples, numbered, patterns, StratifiedKFold(folds, shuffle=True, random_state=0))

    def scores(self, estimator: BaseEstimator, x: np.ndarray) -> np.ndarray:
        """[held-out examples, patterns held out]: each example scored by a fit on the other folds."""
        held_x = x[self.examples]
        return class_scores(
            cross_val_predict(estimator, held_x, self.labels, cv=self.folds, method="decision_function")
        )


def calibrated(scorer: Scorer, x: np.ndarray, labels: np.ndarray, held: HeldOut | None) -> tuple[Scorer, float]:
    """`scorer` fitted on every example, and the temperature that calibrates its scores on held-out examples.
    Raises FloatingPointError when either is not finite."""
    fitted = clone(scorer).fit(x, labels)
    temperature = 1.0
    if held is not None and len(held.patterns) > 1:
        logits = held.scores(scorer, x)
        if not np.isfinite(logits).all():
            raise FloatingPointError("held-out scores are not finite")
        temperature = fit_temperature(torch.from_numpy(logits).float(), torch.from_numpy(held.labels))
    if not np.isfinite(class_scores(fitted.decision_function(x))).all():
        raise FloatingPointError("scores are not finite")
    return fitted, temperature


def held_out_form(form: np.ndarray, labels: np.ndarray, held: HeldOut | None, classes: int) -> list[torch.Tensor]:
    """Per pattern, sorted: how like its pattern's typical form (that of the other folds) each held-out
    example's form is; out-of-store detection ranks a query among these (empty: never out of store)."""
    out = [torch.empty(0)] * classes
    if held is None:
        return out
    similarity = held.scores(CentroidClassifier(), form)[np.arange(len(held.labels)), held.labels]
    for number, pattern in enumerate(held.patterns):
        out[pattern] = torch.from_numpy(np.sort(similarity[held.labels == number])).float()
    return out


@dataclass(frozen=True)
class NgramScorer:
    """The first stage: the rule's scorer on the n-gram blocks alone, and its calibrating temperature."""

    rule: str  # the rule it follows (as `LearntRouter.rule`: centroid where the classifier could not be fitted)
    scorer: Scorer | None  # None: a single pattern
    temperature: float
    scale: float  # the n-gram blocks' length in a feature vector (divided out: the scorer sees unit rows)


@dataclass
class LearntRouter:
    """The router of one store revision: its scorer, temperature and each pattern's typical form."""

    version: int
    names: list[str]
    rule: str
    scorer: Scorer | None  # None: a single pattern (its probability is 1)
    temperature: float
    form_centroids: torch.Tensor  # [patterns, form buckets], unit rows
    held_out_form: list[torch.Tensor] = field(default_factory=list)  # per pattern, sorted held-out similarities
    ngram: NgramScorer | None = None  # the first stage's (None: the features have no n-gram blocks)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        if self.scorer is None:
            return torch.ones(len(features), 1)
        logits = torch.from_numpy(class_scores(self.scorer.decision_function(features.numpy()))).float()
        return torch.softmax(logits / self.temperature, dim=-1)

    def ngram_probabilities(self, ngrams: torch.Tensor) -> torch.Tensor | None:
        """[queries, patterns]: the n-gram stage's calibrated probabilities (None: no n-gram stage)."""
        if self.ngram is None:
            return None
        if self.ngram.scorer is None:
            return torch.ones(len(ngrams), 1)
        x = (ngrams / self.ngram.scale).numpy()
        logits = torch.from_numpy(class_scores(self.ngram.scorer.decision_function(x))).float()
        return torch.softmax(logits / self.ngram.temperature, dim=-1)

    def typicality(self, form: torch.Tensor) -> torch.Tensor:
        """[queries, patterns]: (1 + held-out examples at most as similar) / (1 + held-out examples)."""
        similarity = form @ self.form_centroids.T
        out = torch.ones_like(similarity)
        for j, held in enumerate(self.held_out_form):
            if len(held):
                below = torch.searchsorted(held, similarity[:, j].contiguous(), right=True)
                out[:, j] = (below + 1).float() / (len(held) + 1)
        return out


RECORDED_REASONS = frozenset({"below-threshold", "out-of-store"})
"""Fallback decisions whose queries a fallback record keeps: no stored pattern fits them."""


class Router:
    def __init__(
        self,
        store: PatternStore,
        embedder: Embedder,
        policy: RoutingPolicy | None = None,
        fallback: str | None = None,
        features: RouteFeatures | None = None,
        fitter: FittingProcess | None = None,
        **overrides: Any,
    ) -> None:
        """`policy`: the routing settings (default: `RoutingPolicy()`'s, the server's); `overrides` replace some
        of them (`threshold=0.5`), validated as the policy validates them. `fitter`: where background fits
        run (default: a fitting process of its own, started on the first one)."""
        policy = RoutingPolicy(**((policy or RoutingPolicy()).model_dump() | overrides))
        self.store, self.embedder, self.policy, self.fallback = store, embedder, policy, fallback
        self.rule, self.k, self.threshold = policy.rule, policy.neighbours, policy.threshold
        self.union, self.novelty, self.ngram_gate = policy.union, policy.novelty, policy.ngram_gate
        self.features = features or RouteFeatures()
        self._state: tuple[int, LearntRouter | None] | None = None  # (store version, its router); None: never learnt
        self._lock = threading.Lock()  # one fit at a time
        self._adopted = threading.Condition()  # notified whenever a newer router serves
        self.fitter = fitter or FittingProcess()
        self.relearning = Relearning(self.relearn, name="taskmoe-router-learn", min_interval=RELEARN_INTERVAL)
        #: hears every query that `route(..., record=True)` sends to the fallback (the server's fallback record)
        self.recorder: Callable[[str, Any, torch.Tensor, str], None] | None = None

    # -- deciding ------------------------------------------------------------------------------

    def route(self, text: str, similarity: bool = True, record: bool = False) -> RouteDecision:
        """`record`: a query sent to the fallback goes to `recorder` (served traffic, not reports)."""
        return self.route_texts([text], similarity=similarity, record=record)[0]

    def route_texts(
        self,
        texts: Sequence[str],
        vectors: torch.Tensor | np.ndarray | None = None,
        similarity: bool = True,
        record: bool = False,
    ) -> list[RouteDecision]:
        """Decisions in two stages: the n-gram stage's where it is confident, the full router's for the rest,
        which alone are embedded. `vectors`: the texts' embeddings when already known (batch evaluation
        embeds once). `similarity`: as `route_embedded`'s; it needs every query's embedding, so with it the
        queries the n-gram stage decides are embedded too, for their candidates' similarities only (a report's
        cost: `/v1/route`, `taskmoe route`; the request path asks for none)."""
        learnt = self.current()
        if learnt is None:
            return [RouteDecision((), 0.0, "empty-store", fallback=self.fallback) for _ in texts]
        ngrams = self.features.ngrams(texts)
        typicality = learnt.typicality(self.features.form_block(ngrams))
        stored = set(self.store.names())
        decisions: list[RouteDecision | None] = [None] * len(texts)
        probabilities = learnt.ngram_probabilities(ngrams) if self.ngram_gate < 1 else None
        if probabilities is not None:
            decisions = [
                self._first_stage(learnt, p, t, stored) for p, t in zip(probabilities, typicality, strict=True)
            ]
        rest = [i for i, decision in enumerate(decisions) if decision is None]
        if similarity and len(rest) < len(texts):
            vectors = self.embedder.embed(list(texts)) if vectors is None else vectors
            decisions = [d if d is None else self._with_similarity(d, vectors[i]) for i, d in enumerate(decisions)]
        if rest:
            chosen = [texts[i] for i in rest]
            embedded = self.embedder.embed(chosen) if vectors is None else np.asarray(vectors)[rest]
            full = self._full(learnt, chosen, embedded, ngrams[rest], typicality[rest], stored, similarity)
            for k, (i, decision) in enumerate(zip(rest, full, strict=True)):
                decisions[i] = decision
                if record and self.recorder is not None and decision.reason in RECORDED_REASONS:
                    self.recorder(texts[i], embedded[k], ngrams[i], decision.reason)
        return decisions  # type: ignore[return-value]

    def route_embedded(
        self, texts: Sequence[str], vectors: torch.Tensor | np.ndarray, similarity: bool = True
    ) -> list[RouteDecision]:
        """The full router's decisions (no n-gram stage) for queries whose embeddings are already known.
        `similarity`: search the store's example index for each candidate's nearest example; no decision
        depends on it, only reports do (`/v1/route`, `taskmoe route`), so the request path skips the search."""
        learnt = self.current()
        if learnt is None:
            return [RouteDecision((), 0.0, "empty-store", fallback=self.fallback) for _ in texts]
        ngrams = self.features.ngrams(texts)
        typicality = learnt.typicality(self.features.form_block(ngrams))
        return self._full(learnt, texts, vectors, ngrams, typicality, set(self.store.names()), similarity)

    def _full(
        self,
        learnt: LearntRouter,
        texts: Sequence[str],
        vectors: torch.Tensor | np.ndarray,
        ngrams: torch.Tensor,
        typicality: torch.Tensor,
        stored: set[str],
        similarity: bool,
    ) -> list[RouteDecision]:
        vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32)).reshape(len(texts), -1)
        probabilities = learnt.probabilities(self.features.transform(texts, vectors, ngrams))
        return [
            self._decide(learnt, probabilities[i], typicality[i], self._nearest(vectors[i], similarity), stored)
            for i in range(len(texts))
        ]

    def _nearest(self, vector: torch.Tensor, similarity: bool) -> list[SearchHit]:
        """The patterns of the query's `k` nearest examples (FAISS), or none when nobody reads them."""
        return self.store.search(vector, k=self.k) if similarity else []

    def _with_similarity(self, decision: RouteDecision, vector: torch.Tensor | np.ndarray) -> RouteDecision:
        """`decision` with each candidate's similarity to its nearest example (the decision stays)."""
        query = torch.as_tensor(np.asarray(vector, dtype=np.float32)).reshape(-1)
        nearest = {hit.name: hit.score for hit in self._nearest(query, True)}
        candidates = tuple(replace(c, similarity=nearest.get(c.pattern)) for c in decision.candidates)
        return replace(decision, candidates=candidates)

    def _first_stage(
        self, learnt: LearntRouter, probabilities: torch.Tensor, typicality: torch.Tensor, stored: set[str]
    ) -> RouteDecision | None:
        """The n-gram stage's decision: its most probable pattern when that is probable enough, typical of the
        query and still stored; None: the full router decides."""
        top = int(probabilities.argmax())
        if float(probabilities[top]) < self.ngram_gate or float(typicality[top]) < self.novelty:
            return None
        if learnt.names[top] not in stored:
            return None
        order = probabilities.argsort(descending=True).tolist()
        candidates = tuple(
            Candidate(learnt.names[j], float(probabilities[j]), float(typicality[j]), None) for j in order
        )
        return RouteDecision(
            (learnt.names[top],),
            float(probabilities[top]),
            learnt.ngram.rule,
            candidates,
            typicality=float(typicality[top]),
            by_ngrams=True,
        )

    def _decide(
        self,
        learnt: LearntRouter,
        probabilities: torch.Tensor,
        typicality: torch.Tensor,
        hits: list[SearchHit],
        stored: set[str],
    ) -> RouteDecision:
        """The decision among the patterns still `stored`: one learnt before a pattern left keeps that
        pattern's probability, so that its queries fall below the threshold rather than go to a neighbour."""
        nearest = {hit.name: hit.score for hit in hits}
        order = probabilities.argsort(descending=True).tolist()
        candidates = tuple(
            Candidate(learnt.names[j], float(probabilities[j]), float(typicality[j]), nearest.get(learnt.names[j]))
            for j in order
        )
        order = [j for j in order if learnt.names[j] in stored]
        if not order:  # every pattern it knows has left: the new router is being learnt
            return RouteDecision((), 0.0, "store-changed", candidates, self.fallback)
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

    def current(self) -> LearntRouter | None:
        """The router requests use: the last one learnt, also while the store has moved on (then a new one
        is learnt in the background and replaces it when ready: a request never waits for a fit). Only the
        very first is learnt on the calling thread."""
        state = self._state
        if state is None:
            return self.learn()
        if state[0] != self.store.version:
            self.relearning.request()
        return state[1]

    @property
    def learnt_version(self) -> int | None:
        """The store version routing uses now (None: never learnt)."""
        state = self._state
        return None if state is None else state[0]

    def learn(self) -> LearntRouter | None:
        """The router of the store as it is now (None: nothing routable), learnt on the calling thread when
        the store changed since the last one; it then serves every request. For start-up and tools: a
        running server learns in the fitting process (`relearn`, `catch_up`)."""
        with self._lock:
            state = self._state
            if state is not None and state[0] == self.store.version:
                return state[1]  # checked without reading the examples
            examples = self.store.examples()
            learnt = fit_router(self.rule, self.features.weights, examples) if examples.owners else None
            self._adopt(examples.version, learnt)
            return learnt

    def relearn(self) -> None:
        """Learn the store as it is now in the fitting process, then serve with it; what the background
        relearning runs (requests go on with the old router meanwhile)."""
        examples = self.store.examples()
        state = self._state
        if state is not None and state[0] >= examples.version:
            return
        learnt = self.fitter.run(fit_router, self.rule, self.features.weights, examples) if examples.owners else None
        with self._lock:
            self._adopt(examples.version, learnt)

    def catch_up(self, timeout: float | None = 120.0) -> bool:
        """Wait until routing knows the store at least as it is now (learnt in the background like any
        change; later changes need not be learnt too): after an admin call's change, so that its pattern is
        routable when the call returns. False on timeout."""
        version = self.store.version
        self.relearning.request()
        with self._adopted:
            return self._adopted.wait_for(lambda: (self.learnt_version or 0) >= version, timeout)

    def _adopt(self, version: int, learnt: LearntRouter | None) -> None:
        """Serve with `learnt` unless a router of a later store version already serves (under `_lock`)."""
        if self._state is None or self._state[0] < version:
            self._state = (version, learnt)  # one assignment: a request sees the old or the new
            if learnt is not None:  # logged here: a fit in the fitting process logs nowhere
                log.info(
                    "routing: learnt %d patterns of store revision %d (%s, temperature %.3g)",
                    len(learnt.names),
                    version,
                    learnt.rule,
                    learnt.temperature,
                )
            with self._adopted:
                self._adopted.notify_all()

    def close(self) -> None:
        self.fitter.close()


def _scorer(rule: str, x: np.ndarray, labels: np.ndarray, held: HeldOut | None) -> tuple[str, Scorer, float]:
    """The rule's scorer and its temperature; a classifier that cannot be fitted (or is not finite) gives way
    to centroids, which cannot fail: one bad pattern must not take routing down for all the others."""
    if rule == "classifier":
        try:  # sparse: the n-gram blocks are ~4% filled, and the fit takes half the time (same optimum)
            return "classifier", *calibrated(SoftmaxRegression(), scipy.sparse.csr_matrix(x), labels, held)
        except Exception:
            log.exception("routing: fitting the classifier on %d examples failed; routing by centroid", len(labels))
    return "centroid", *calibrated(CentroidClassifier(), x, labels, held)


def fit_router(rule: str, weights: FeatureWeights, examples: Examples) -> LearntRouter:
    """The router of `examples` (which name at least one pattern): a module function, so that the fitting
    process can run it."""
    names = sorted(set(examples.owners))
    features = RouteFeatures(weights)
    ngrams = features.ngrams(examples.texts)
    x = features.transform(examples.texts, examples.vectors, ngrams)
    labels = np.array([names.index(owner) for owner in examples.owners])
    held = HeldOut.of(labels)
    learnt_rule, scorer, temperature, ngram = rule, None, 1.0, None
    form = features.form_block(x).numpy()
    # one BLAS thread: the fits are small, and scipy's L-BFGS-B with a multithreaded OpenBLAS learnt the
    # benchmark store (scripts/eval_routing.py) 4 to 7 times slower on a busy 2-core CPU
    with threadpool_limits(1, user_api="blas"):
        if len(names) > 1:
            learnt_rule, scorer, temperature = _scorer(rule, x.numpy(), labels, held)
        if features.ngram_weight > 0:
            ngram = _ngram_scorer(rule, ngrams, features.ngram_weight**0.5, labels, held, len(names))
        centroids = torch.from_numpy(CentroidClassifier().fit(form, labels).centroids_)
        typical = held_out_form(form, labels, held, len(names))
    return LearntRouter(examples.version, names, learnt_rule, scorer, temperature, centroids, typical, ngram)


def _ngram_scorer(
    rule: str, ngrams: torch.Tensor, scale: float, labels: np.ndarray, held: HeldOut | None, patterns: int
) -> NgramScorer:
    """The n-gram stage's scorer, fitted and calibrated as the full one is, on unit-length n-gram rows."""
    if patterns == 1:
        return NgramScorer(rule, None, 1.0, scale)
    return NgramScorer(*_scorer(rule, (ngrams / scale).numpy(), labels, held), scale)
