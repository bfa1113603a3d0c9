"""Live coverage of each pattern on the tokens the expert pool serves it (`pattern_store.coverage`).

A sampled forward pass (a share `rate` of them, drawn at random) runs each sparse layer's full router a
second time, without the rows' masks, on the hidden states the rows really have, and records for every
token the share of the full router's top-k gate mass on experts its pattern keeps, and whether the heaviest
choice is kept. One row of one sampled pass (its real tokens, every sparse layer) is one sample of its
pattern. Per pattern the meter keeps the running means over every sampled token, per layer and overall,
and the mean of the last `window` generated tokens sampled (decode steps: on the demo their coverage tells
right answers from wrong ones better than the prompt's, `scripts/eval_coverage.py`); when at least
`min_samples` of those fall on average more than `tolerance` below the coverage the pattern recorded at
calibration (on its answers' tokens when it recorded them: `reference_coverage`), the pattern is flagged:
its traffic is no longer the task it was calibrated for. Nothing runs when the meter is off (`rate` 0: the
pool has no meter).

Coverage tells whether a pattern's traffic routes as its task did; whether the answers are right, it tells
only in part (ROC AUC about 0.8 across the demo's cross-task matrix). The served model's own confidence tells
more (about 0.94): a share `rate` of the requests a pattern serves is watched (`AnswerConfidence`), the
probability the served model gave each token it generated is averaged per request, and the meter keeps each
pattern's mean over its watched requests and over the last `window` of them.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pattern_store.coverage import token_coverage

log = logging.getLogger("taskmoe.coverage")

WINDOW = 200
"""Generated tokens sampled (rows of sampled decode steps) that the recent mean and the flag look at."""
MIN_SAMPLES = 40
"""Generated tokens sampled that a pattern needs before it can be flagged."""


@dataclass
class PatternCoverage:
    """What the meter knows of one pattern (one revision of it)."""

    label: str
    revision: str
    calibrated: float | None
    tokens: int = 0
    samples: int = 0
    mass: dict[int, float] = field(default_factory=dict)  # per sparse layer: sums over sampled tokens
    top1: dict[int, float] = field(default_factory=dict)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    flagged: bool = False
    confidence: float = 0.0  # sum over watched requests of each one's mean token probability
    confident_requests: int = 0  # watched requests
    recent_confidence: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def report(self) -> dict[str, Any]:
        tokens = max(self.tokens, 1)
        layers = {
            str(layer): {"mass": self.mass[layer] / tokens, "top1": self.top1[layer] / tokens} for layer in self.mass
        }
        count = max(len(layers), 1)
        return {
            # None until a token is sampled (a pattern may first be heard of through a watched request)
            "mass": sum(entry["mass"] for entry in layers.values()) / count if layers else None,
            "top1": sum(entry["top1"] for entry in layers.values()) / count if layers else None,
            "recent_mass": sum(self.recent) / len(self.recent) if self.recent else None,
            "samples": self.samples,
            "tokens": self.tokens,
            "layers": layers,
            "flagged": self.flagged,
            "confidence": self.confidence / self.confident_requests if self.confident_requests else None,
            "recent_confidence": sum(self.recent_confidence) / len(self.recent_confidence)
            if self.recent_confidence
            else None,
            "confidence_requests": self.confident_requests,
        }


@dataclass
class AnswerConfidence:
    """The probabilities a served model gave the tokens one watched request generated (before temperature
    and top-p: the model's own distribution), summed over its steps and choices."""

    total: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, tokens: Sequence[int]) -> None:
        """One step: the logits [n, vocab] the choices' `tokens` were sampled from."""
        chosen = torch.tensor(tokens, device=logits.device).reshape(-1, 1)
        probabilities = torch.softmax(logits.float(), dim=-1).gather(1, chosen)
        self.total += float(probabilities.sum())
        self.tokens += len(tokens)

    @property
    def mean(self) -> float | None:
        return self.total / self.tokens if self.tokens else None


class CoverageSample:
    """The sampled forward passes of one `PooledModel.rows` block (usually one pass): each sparse layer's
    per-token coverage, as the layers run."""

    def __init__(self, routes: Sequence[Any], attention_mask: torch.Tensor | None) -> None:
        self.routes = list(routes)
        self.attention_mask = attention_mask
        self.passes: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []

    def add(self, layer: int, weights: torch.Tensor, experts: torch.Tensor, pruned: torch.Tensor | None) -> None:
        """The full router's `weights` and `experts` [tokens, k] at `layer`; `pruned` [tokens, experts] (None:
        no row prunes this layer, every token is covered). A layer seen again starts the next pass."""
        if not self.passes or layer in self.passes[-1]:
            self.passes.append({})
        weights = weights.reshape(-1, weights.shape[-1])
        if pruned is None:
            ones = torch.ones(weights.shape[0], dtype=torch.float32, device=weights.device)
            self.passes[-1][layer] = (ones, ones)
            return
        self.passes[-1][layer] = token_coverage(weights, experts.reshape(-1, experts.shape[-1]), pruned)


class CoverageMeter:
    """Samples forward passes at `rate` and keeps each pattern's live coverage; `listener` hears every update."""

    def __init__(
        self,
        rate: float,
        tolerance: float,
        listener: Callable[[PatternCoverage], None] | None = None,
        min_samples: int = MIN_SAMPLES,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"a coverage sampling rate is in (0, 1], not {rate}")
        self.rate, self.tolerance, self.listener, self.min_samples = rate, tolerance, listener, min_samples
        self._random = random.Random(seed)
        self._patterns: dict[str, PatternCoverage] = {}
        self._lock = threading.Lock()

    def draw(self) -> bool:
        """Whether the next forward pass is sampled."""
        with self._lock:
            return self._random.random() < self.rate

    def finish(self, sample: CoverageSample) -> None:
        """Fold a sample's passes into their rows' patterns (reads the figures back from the device)."""
        for recorded in sample.passes:
            self._fold(sample, recorded)

    def _fold(self, sample: CoverageSample, recorded: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = sorted(recorded)
        rows = len(sample.routes)
        mass = torch.stack([recorded[layer][0] for layer in layers]).reshape(len(layers), rows, -1)
        top1 = torch.stack([recorded[layer][1] for layer in layers]).reshape(len(layers), rows, -1)
        valid = torch.ones(mass.shape[1:], dtype=torch.float32, device=mass.device)
        if sample.attention_mask is not None:
            valid = sample.attention_mask[:, -mass.shape[2] :].to(mass.device, torch.float32)
        row_mass = (mass * valid).sum(-1).cpu()  # [layers, rows]: sums over each row's real tokens
        row_top1 = (top1 * valid).sum(-1).cpu()
        tokens = valid.sum(-1).cpu().tolist()
        touched: dict[str, PatternCoverage] = {}
        with self._lock:  # the listener too: it reads entries that other threads' passes change
            for row, route in enumerate(sample.routes):
                if not route.kept or tokens[row] == 0:
                    continue  # the full model covers itself
                entry = self._entry(route)
                for position, layer in enumerate(layers):
                    entry.mass[layer] = entry.mass.get(layer, 0.0) + float(row_mass[position, row])
                    entry.top1[layer] = entry.top1.get(layer, 0.0) + float(row_top1[position, row])
                entry.tokens += int(tokens[row])
                entry.samples += 1
                if mass.shape[2] == 1:  # a decode step: the flag follows generated tokens (they tell more)
                    entry.recent.append(float(row_mass[:, row].sum()) / len(layers))
                    self._judge(entry)
                touched[entry.label] = entry
            if self.listener is not None:
                for entry in touched.values():
                    self.listener(entry)

    def watch(self, route: Any) -> AnswerConfidence | None:
        """A confidence watch for a new request of `route` (a share `rate` of a pattern's requests; None for
        the others and for the full model)."""
        if route is None or not route.kept:
            return None
        with self._lock:
            return AnswerConfidence() if self._random.random() < self.rate else None

    def finish_watch(self, route: Any, watched: AnswerConfidence) -> None:
        """Fold a finished watched request's mean token probability into its pattern."""
        mean = watched.mean
        if mean is None:
            return
        with self._lock:
            entry = self._entry(route)
            entry.confidence += mean
            entry.confident_requests += 1
            entry.recent_confidence.append(mean)
            if self.listener is not None:
                self.listener(entry)

    def report(self, label: str) -> dict[str, Any] | None:
        """The live coverage of the pattern (or union) `label`; None before any of its tokens was sampled."""
        with self._lock:
            entry = self._patterns.get(label)
            return None if entry is None else entry.report() | {"calibrated": entry.calibrated}

    def flagged(self) -> list[str]:
        with self._lock:
            return sorted(label for label, entry in self._patterns.items() if entry.flagged)

    def _entry(self, route: Any) -> PatternCoverage:
        entry = self._patterns.get(route.label)
        if entry is None or entry.revision != route.revision:  # a new pattern under the name: start again
            entry = PatternCoverage(route.label, route.revision, route.calibrated)
            self._patterns[route.label] = entry
        return entry

    def _judge(self, entry: PatternCoverage) -> None:
        if entry.calibrated is None or len(entry.recent) < self.min_samples:
            return
        recent = sum(entry.recent) / len(entry.recent)
        low = recent < entry.calibrated - self.tolerance
        if low and not entry.flagged:
            log.warning(
                "pattern %s: live coverage %.3f over its last %d samples, below its calibrated %.3f by more "
                "than %.2f: its traffic may not be the task it was calibrated for",
                entry.label, recent, len(entry.recent), entry.calibrated, self.tolerance,
            )  # fmt: skip
        elif entry.flagged and not low:
            log.info("pattern %s: live coverage %.3f is back within %.2f of its calibrated %.3f",
                     entry.label, recent, self.tolerance, entry.calibrated)  # fmt: skip
        entry.flagged = low
