"""A keep set by quality (`--keep auto --target T`): the fewest experts whose answers still match the full
model's on prompts the selection never saw.

How many experts a task can do without differs by task (on the demo, arithmetic keeps its answers at a
quarter of the experts, upper-casing loses them below half), and a user cannot know it in advance. So
calibration holds out a share of the task's prompts (every fourth), scores and selects on the rest with the
recipe (its method, layer budget and refinement), and asks, for a grid of expert counts, how often the
pruned model's greedy answer to a held-out prompt equals the full model's. The share is taken to fall as
experts are removed, so a binary search over the grid finds the smallest count whose share is at least the
target in a few selections; that selection is the pattern, and its share on the held-out prompts is the
estimate it records. The full model answers the held-out prompts, so it must fit in memory (as for `e2e`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.model.pruning import PrunedSelection

HELD_OUT_EVERY = 4
"""Every fourth calibration prompt is held out to judge the selections."""
MIN_HELD_OUT = 4
"""Fewer held-out prompts than this cannot say whether a target is met."""
GRID_STEPS = 16
"""The grid of expert counts: about this many steps from the fewest allowed to all."""

Evaluate = Callable[[int], tuple[PrunedSelection, dict[str, Any], float]]
"""An expert count -> its selection, the record of how it was chosen, and its held-out agreement."""


@dataclass
class KeepSearch:
    """What the search tried and chose: the pattern records it (`parameters.keep_search`)."""

    target: float
    experts: int  # per layer (the layer budget spreads this many times the layers when adaptive)
    of: int
    estimate: float  # the chosen selection's agreement with the full model on the held-out prompts
    held_out: int
    tried: dict[int, float] = field(default_factory=dict)  # expert count -> agreement
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "experts": self.experts,
            "of": self.of,
            "estimate": round(self.estimate, 4),
            "held_out": self.held_out,
            "tried": {str(count): round(share, 4) for count, share in sorted(self.tried.items())},
            "seconds": round(self.seconds, 1),
        }


def candidate_counts(num_experts: int, top_k: int, groups: int = 1) -> list[int]:
    """The expert counts the search may choose, ascending: at least `top_k` (and two per group with
    `groups` > 1), multiples of the groups, about `GRID_STEPS` steps up to every expert."""
    step = max(groups, num_experts // GRID_STEPS)
    step = -(-step // groups) * groups
    minimum = max(top_k, 2 * groups) if groups > 1 else top_k
    minimum = -(-minimum // groups) * groups
    first = -(-minimum // step) * step
    counts = [minimum] if minimum < first else []
    counts += range(first, num_experts, step)
    return [*counts, num_experts]


def held_out_indices(prompts: int) -> list[int]:
    """Which calibration prompts are held out: every `HELD_OUT_EVERY`-th (the last of each group of four)."""
    held = [index for index in range(prompts) if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    if len(held) < MIN_HELD_OUT:
        raise ValueError(
            f"keep auto holds out every {HELD_OUT_EVERY}th calibration prompt and needs at least {MIN_HELD_OUT} "
            f"of them: give at least {HELD_OUT_EVERY * MIN_HELD_OUT} prompts (got {prompts})"
        )
    return held


def agreement(answers: Sequence[tuple[int, ...]], reference: Sequence[tuple[int, ...]]) -> float:
    """The share of prompts whose answer equals the reference answer, token for token."""
    return sum(a == b for a, b in zip(answers, reference, strict=True)) / len(reference)


def search_keep(
    counts: Sequence[int],
    evaluate: Evaluate,
    target: float,
    held_out: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[PrunedSelection | None, dict[str, Any], KeepSearch]:
    """The smallest of `counts` (ascending; the last keeps every expert) whose agreement is at least `target`,
    by binary search. Returns its selection (None: only every expert meets the target) and record."""
    started = time.perf_counter()
    tried: dict[int, float] = {}
    found: dict[int, tuple[PrunedSelection, dict[str, Any]]] = {}
    low, high = 0, len(counts) - 1  # every expert: agreement 1 by definition, never evaluated
    steps = max(1, (len(counts) - 1).bit_length())
    while low < high:
        middle = (low + high) // 2
        selection, record, share = evaluate(counts[middle])
        tried[counts[middle]], found[counts[middle]] = share, (selection, record)
        if share >= target:
            high = middle
        else:
            low = middle + 1
        if progress is not None:
            progress(len(tried), steps)
    chosen = counts[low]
    search = KeepSearch(target, chosen, counts[-1], tried.get(chosen, 1.0), held_out, tried)
    search.seconds = time.perf_counter() - started
    selection, record = found.get(chosen, (None, {}))
    return selection, record, search
