"""Candidate tasks in the traffic no pattern covers: clusters of a fallback record (`fallback_record`).

Each recorded query is placed as routing places it: its embedding (unit length, weighted as routing
weighs the topic block) beside its n-gram features (already weighted), and the queries are clustered by
cosine distance (scikit-learn's agglomerative clustering, average linkage, cut at a distance rather than a
number of clusters: nobody knows how many tasks the traffic holds). A cluster of at least `min_size`
queries is a suggestion: its
size, why its queries went to the fallback, a few example prompts (when text was recorded), and the stored
pattern nearest to its centre (the nearest example prompt in the store's index) with that similarity; a
cluster that sits on an existing pattern's examples says which pattern already covers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pattern_store.fallback_record import RecordedQuery

if TYPE_CHECKING:
    from pattern_store.store import PatternStore

MIN_SIZE = 5
"""The fewest queries a suggestion groups."""
COVERED_SIMILARITY = 0.9
"""A cluster whose centre is this similar to a stored pattern's example is that pattern's traffic (a
query can fall back below the routing threshold between two patterns): the suggestion names it."""
EXAMPLES = 5
CLUSTER_DISTANCE = 0.8
"""Where the clustering is cut (average cosine distance between clusters): chosen on one split of the
prompts by `scripts/eval_suggest.py`, which reports on another."""


@dataclass(frozen=True)
class Suggestion:
    """One candidate task: `members` index the record's queries."""

    cluster: int
    size: int
    reasons: dict[str, int]
    examples: list[str]
    nearest_pattern: str | None
    similarity: float | None
    covered_by: str | None
    members: list[int]

    def prompts(self, queries: Sequence[RecordedQuery]) -> list[str]:
        """The recorded text of its queries (`queries`: the record it was suggested from), where kept."""
        return [queries[i].text for i in self.members if queries[i].text is not None]

    def to_json(self, members: bool = False) -> dict[str, Any]:
        found = asdict(self)
        if not members:
            found.pop("members")
        return found


def features(queries: Sequence[RecordedQuery], ngram_width: int, topic_weight: float) -> np.ndarray:
    """[queries, dim + ngram_width]: each query as routing's feature vector."""
    embeddings = np.stack([q.embedding for q in queries]).astype(np.float32)
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    ngrams = np.stack([q.ngrams(ngram_width) for q in queries])
    return np.concatenate([embeddings * topic_weight**0.5, ngrams], axis=1)


def cluster(vectors: np.ndarray, min_size: int = MIN_SIZE, distance: float = CLUSTER_DISTANCE) -> np.ndarray:
    """A cluster label per row (-1: in a cluster of fewer than `min_size`): agglomerative clustering with
    average linkage on cosine distances, cut where clusters are `distance` apart."""
    from sklearn.cluster import AgglomerativeClustering

    if len(vectors) < max(min_size, 2):
        return np.full(len(vectors), -1)
    labels = AgglomerativeClustering(
        n_clusters=None, distance_threshold=distance, metric="cosine", linkage="average"
    ).fit_predict(vectors)
    counts = np.bincount(labels)
    return np.array([label if counts[label] >= min_size else -1 for label in labels.tolist()])


def suggest(
    queries: Sequence[RecordedQuery],
    store: PatternStore,
    ngram_width: int,
    topic_weight: float,
    min_size: int = MIN_SIZE,
    distance: float = CLUSTER_DISTANCE,
) -> list[Suggestion]:
    """The record's clusters of at least `min_size` queries, the largest first."""
    if not queries:
        return []
    labels = cluster(features(queries, ngram_width, topic_weight), min_size, distance)
    found = []
    for label in sorted(set(labels.tolist()) - {-1}):
        members = [i for i, value in enumerate(labels.tolist()) if value == label]
        centre = np.stack([queries[i].embedding for i in members]).mean(axis=0)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        hits = store.search(centre.astype(np.float32), k=1) if store.names() else []
        nearest, similarity = (hits[0].name, float(hits[0].score)) if hits else (None, None)
        reasons: dict[str, int] = {}
        for i in members:
            reasons[queries[i].reason] = reasons.get(queries[i].reason, 0) + 1
        examples = [queries[i].text for i in members if queries[i].text is not None][:EXAMPLES]
        covered = nearest if similarity is not None and similarity >= COVERED_SIMILARITY else None
        found.append(Suggestion(label, len(members), reasons, examples, nearest, similarity, covered, members))
    found.sort(key=lambda s: -s.size)
    return [replace(s, cluster=rank) for rank, s in enumerate(found)]  # numbered by size, largest 0
