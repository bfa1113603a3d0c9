"""The router on synthetic embeddings: its rules, and that a failing classifier never takes routing down."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import server.routing as routing
from pattern_store.pattern import TaskPattern
from pattern_store.selection import Selection
from pattern_store.store import PatternStore
from server.routing import Router

DIM = 8


class AxisEmbedder:
    """Texts 'axis N' embed to the unit vector of axis N (a real embedder is tested end to end)."""

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, int(text.split()[1])] = 1.0
        return out


def _pattern(name: str, axis: int) -> TaskPattern:
    rows = torch.eye(DIM)[[axis, axis, axis]] + 0.05 * torch.rand(3, DIM, generator=torch.Generator().manual_seed(axis))
    return TaskPattern(
        name=name,
        selection=Selection("moe_experts", {0: [0, 1]}),
        scores={0: torch.ones(4)},
        method="reap",
        parameters={},
        model_fingerprint="f" * 64,
        created=1.0,
        calibration_prompts=3,
        examples=[f"{name} {i}" for i in range(3)],
        example_embeddings=torch.nn.functional.normalize(rows, dim=1),
    )


@pytest.fixture()
def store(tmp_path) -> PatternStore:
    store = PatternStore(tmp_path)
    for axis, name in enumerate(["arith", "sort", "upper"]):
        store.add(_pattern(name, axis))
    return store


@pytest.mark.parametrize("rule", ["classifier", "centroid", "knn"])
def test_each_rule_routes_to_the_nearest_task(store, rule) -> None:
    router = Router(store, AxisEmbedder(), rule=rule, threshold=0.3)
    assert router.route("axis 1").pattern == "sort"
    below = router.route("axis 6")
    assert below.pattern is None and below.reason == "below-threshold"


def test_a_classifier_that_cannot_be_fitted_falls_back_to_centroids_loudly(store, monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise FloatingPointError("overflow in the line search")

    monkeypatch.setattr(routing, "fit_linear_classifier", broken)
    router = Router(store, AxisEmbedder())
    with caplog.at_level(logging.ERROR, logger="taskmoe.routing"):
        decision = router.route("axis 2")
    assert decision.pattern == "upper" and decision.reason == "centroid"
    assert "routing by centroid" in caplog.text


def test_a_classifier_with_non_finite_weights_is_not_used(store, monkeypatch) -> None:
    def poisoned(x, y, classes, l2=1e-3):
        layer = torch.nn.Linear(x.shape[1], classes)
        with torch.no_grad():
            layer.weight.fill_(float("nan"))
        return layer

    monkeypatch.setattr(routing, "fit_linear_classifier", poisoned)
    decision = Router(store, AxisEmbedder()).route("axis 0")
    assert decision.pattern == "arith" and decision.reason == "centroid"
