"""A keep set by quality (`--keep auto --target T`): the fewest experts whose answers still match the full
model's on prompts the selection never saw.

How many experts a task can do without differs by task (on the demo, arithmetic keeps its answers at a
quarter of the experts, upper-casing loses them below half), and a user cannot know it in advance. So
calibration holds out a share of the task's prompts (every fourth), scores and selects on the rest with the
recipe (its method, layer budget and refinement), and asks, for a grid of expert counts, how often the
pruned model's greedy answer to a held-out prompt equals the full model's. The share is taken to fall as
experts are removed, so a binary search over the grid finds the smallest count whose share is at least the
target in a few selections; that selection is the pattern. The full model answers the held-out prompts, so
it must fit in memory (as for `e2e`).

The estimate is not the raw share of matching answers but Laplace's rule of succession, (matched + 1) /
(held out + 2): the mean of the agreement rate's posterior under a uniform prior. The raw share is biased up
exactly where the search stops (the smallest count whose noisy share passes; on demo-moe two tasks chosen at
127 of 128 held-out answers, 99.2%, kept 98.5% on new prompts), and it claims 100% from any number of
prompts. The succession estimate asks for enough held-out prompts to show a target at all (98 for 0.99:
`held_out_needed`), and calibration refuses fewer before the long part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line's help reads this module: no torch
    from server.model.pruning import PrunedSelection

HELD_OUT_EVERY = 4
"""Every fourth calibration prompt is held out to judge the selections."""
MIN_HELD_OUT = 4
"""Fewer held-out prompts than this cannot say whether a target is met."""
GRID_STEPS = 16
"""The grid of expert counts: about this many steps from the fewest allowed to all."""

Evaluate = Callable[[int], tuple["PrunedSelection", dict[str, Any], int]]
"""An expert count -> its selection, the record of how it was chosen, and how many held-out answers matched."""


@dataclass
class KeepSearch:
    """What the search tried and chose: the pattern records it (`parameters.keep_search`)."""

    target: float
    experts: int  # per layer (the layer budget spreads this many times the layers when adaptive)
    of: int
    estimate: float  # the chosen selection's agreement with the full model, by the rule of succession
    held_out: int
    matched: int  # the chosen selection's held-out answers that equal the full model's
    tried: dict[int, float] = field(default_factory=dict)  # expert count -> raw share of matching answers
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "experts": self.experts,
            "of": self.of,
            "estimate": round(self.estimate, 4),
            "held_out": self.held_out,
            "matched": self.matched,
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


def estimated_agreement(matched: int, held_out: int) -> float:
    """How often answers agree, estimated from `matched` of `held_out`: the rule of succession."""
    return (matched + 1) / (held_out + 2)


def held_out_needed(target: float) -> int:
    """The fewest held-out prompts whose estimate can reach `target` (all of them matching)."""
    if not 0 < target < 1:
        raise ValueError(f"a target of keep auto is a share in (0, 1), got {target}")
    needed = max(MIN_HELD_OUT, math.ceil((2 * target - 1) / (1 - target)))
    # the division rounds: a step either way settles it on the fewest
    while needed > MIN_HELD_OUT and estimated_agreement(needed - 1, needed - 1) >= target:
        needed -= 1
    while estimated_agreement(needed, needed) < target:
        needed += 1
    return needed


def held_out_indices(prompts: int, target: float | None = None) -> list[int]:
    """Which calibration prompts are held out: every `HELD_OUT_EVERY`-th (the last of each group of four).
    Refuses too few to show `target` (when given) with the estimate."""
    held = [index for index in range(prompts) if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    needed = MIN_HELD_OUT if target is None else held_out_needed(target)
    if len(held) < needed:
        why = (
            f"to show a target of {target:g} (the estimate is (matched + 1) / (held out + 2), at most "
            f"{estimated_agreement(len(held), len(held)):.3f} with {len(held)})"
            if target is not None and needed > MIN_HELD_OUT
            else "to judge a selection"
        )
        raise ValueError(
            f"keep auto holds out every {HELD_OUT_EVERY}th calibration prompt and needs at least {needed} of them "
            f"{why}: give at least {HELD_OUT_EVERY * needed} prompts (got {prompts})"
        )
    return held


def matches(answers: Sequence[tuple[int, ...]], reference: Sequence[tuple[int, ...]]) -> int:
    """How many prompts' answers equal the reference answer, token for token."""
    return sum(a == b for a, b in zip(answers, reference, strict=True))


def search_keep(
    counts: Sequence[int],
    evaluate: Evaluate,
    target: float,
    held_out: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[PrunedSelection | None, dict[str, Any], KeepSearch]:
    """The smallest of `counts` (ascending; the last keeps every expert) whose estimated agreement is at least
    `target`, by binary search. Returns its selection (None: only every expert meets the target) and record;
    `tried` records the raw share of matching answers of each count evaluated."""
    started = time.perf_counter()
    matched: dict[int, int] = {}
    found: dict[int, tuple[PrunedSelection, dict[str, Any]]] = {}
    low, high = 0, len(counts) - 1  # every expert: every answer matches by definition, never evaluated
    steps = max(1, (len(counts) - 1).bit_length())
    while low < high:
        middle = (low + high) // 2
        selection, record, matched[counts[middle]] = evaluate(counts[middle])
        found[counts[middle]] = (selection, record)
        if estimated_agreement(matched[counts[middle]], held_out) >= target:
            high = middle
        else:
            low = middle + 1
        if progress is not None:
            progress(len(matched), steps)
    chosen = counts[low]
    agreed = matched.get(chosen, held_out)
    tried = {count: hits / held_out for count, hits in matched.items()}
    search = KeepSearch(target, chosen, counts[-1], estimated_agreement(agreed, held_out), held_out, agreed, tried)
    search.seconds = time.perf_counter() - started
    selection, record = found.get(chosen, (None, {}))
    return selection, record, search
