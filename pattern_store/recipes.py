"""The names a pattern recipe is made of, in one place and without importing torch (the CLI's help uses them).

A recipe says how a task's calibration statistics become the experts (or channels) it keeps: a scoring
method, for MoE a layer budget and a refinement, for dense models a sparsity.
"""

from __future__ import annotations

#: routing scores (`pattern_store.tcess`): from the router's choices alone
ROUTING_METHODS: tuple[str, ...] = ("tcess", "tcess-logit", "frequency")
#: output-aware scores (`pattern_store.expert_scores`): they also look at what each expert writes
OUTPUT_METHODS: tuple[str, ...] = ("reap", "ean", "easy-ep")
#: every expert scoring method; `random` is the baseline
MOE_METHODS: tuple[str, ...] = (*ROUTING_METHODS, *OUTPUT_METHODS, "random")
#: the measured best single score on the demo models (`bench/results/pruning.json`, `scripts/eval_pruning.py`)
DEFAULT_MOE_METHOD = "reap"
#: the share of each layer's experts a pattern keeps unless told otherwise (PreMoe's 8/128 point is 0.5)
DEFAULT_KEEP = 0.5
#: `--keep auto`: the fewest experts whose held-out answers match the full model's `--target` share of the time
KEEP_AUTO = "auto"
#: the share `--keep auto` aims at unless told otherwise
DEFAULT_TARGET = 0.99
#: channel scoring methods of dense models (SEAP, its WIFN variant, and the baselines)
DENSE_METHODS: tuple[str, ...] = ("seap", "seap-wifn", "magnitude", "random")
#: how kept experts are spread over layers: the same count in each, what each layer's scores ask for, or the
#: same count in each to start with, then slots moved between layers by the answer loss (with `e2e` refinement)
BUDGETS: tuple[str, ...] = ("uniform", "adaptive", "loss")
#: the layer budget that the answer-loss refinement moves
LOSS_BUDGET = "loss"
#: refinements of an expert selection: layer-local (`server.model.local_refinement`) and end to end by the
#: answer loss (`server.model.answer_loss_refinement`)
REFINEMENTS: tuple[str, ...] = ("none", "local", "e2e")
#: what stands in for a pruned expert when the router still chooses it: nothing (the router cannot choose it),
#: its novice, its mean output on the calibration tokens routed to it (MoNE: a vector, not a slot), or a
#: low-rank novice, the novice plus a rank-r linear map of the token fitted on those tokens
SUBSTITUTES: tuple[str, ...] = ("none", "novice", "low-rank")
NOVICE = "novice"
LOW_RANK = "low-rank"
#: the rank a low-rank novice keeps unless told otherwise (chosen on the choice split: `eval_substitutes.py`)
DEFAULT_RANK = 16


def suggestion_refinement(moe: bool) -> str:
    """The refinement a pattern calibrated from a suggestion gets by default. The full model answers the
    recorded prompts first, so it is in memory anyway, and refining by answer loss closes the gap to a
    pattern calibrated on true answers (demo: arith 84% -> 100%, translate 84% -> 93% against 100% and 94%);
    a dense model has no expert refinement."""
    return "e2e" if moe else "none"


#: how a query is matched to a pattern (`server.routing`): a classifier on the examples, the nearest
#: centroid (both calibrated to probabilities)
ROUTE_RULES: tuple[str, ...] = ("classifier", "centroid")
