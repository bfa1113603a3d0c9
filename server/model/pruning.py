"""From calibration statistics to a selection: which experts (PreMoe) or channels (SEAP) a task keeps.

The scoring math lives in `pattern_store.tcess` and `pattern_store.seap`; this module applies it to a
model: it knows the layers, reads the `down_proj` columns that SEAP's scores and bias need, and offers
the baselines (frequency, raw logit, random, weight magnitude) that every evaluation shows beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pattern_store.expert_scores import keep_top, layer_budget
from pattern_store.recipes import BUDGETS, DENSE_METHODS, LOSS_BUDGET, MOE_METHODS
from pattern_store.seap import bias_compensation, channel_scores, logistic_schedule, prune_layer, standardise
from pattern_store.selection import Selection
from server.model.calibrate import CalibrationStatistics
from server.model.variant import VariantBuilder


@dataclass(frozen=True)
class PrunedSelection:
    selection: Selection
    scores: dict[int, torch.Tensor]


def expert_counts(
    stats: CalibrationStatistics,
    keep: int,
    method: str = "tcess",
    budget: str = "uniform",
    top_k: int = 1,
    groups: int = 1,
    seed: int = 0,
) -> dict[int, int]:
    """Experts each sparse layer keeps: `keep` in each (`budget="uniform"`), or `keep` times the layers in all,
    spread by what each layer's `method` scores ask for (`"adaptive"`: at least `top_k`, and with `groups` > 1
    expert groups a multiple of the groups with at least two per group)."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown layer budget {budget!r}; expected one of {', '.join(BUDGETS)}")
    if budget == LOSS_BUDGET and groups > 1:
        raise ValueError(
            f"budget {LOSS_BUDGET!r} moves one expert at a time, but this model's routing keeps the same number in "
            f"each of {groups} expert groups; use 'uniform' or 'adaptive'"
        )
    if budget in ("uniform", LOSS_BUDGET):  # the loss budget starts uniform; the answer loss moves it
        return dict.fromkeys(stats.router, keep)
    scores = {layer: router.scores(method, seed=seed + layer) for layer, router in stats.router.items()}
    minimum = max(top_k, 2 * groups) if groups > 1 else top_k
    minimum = -(-minimum // groups) * groups
    return layer_budget(scores, keep * len(scores), minimum=minimum, step=groups)


def moe_selection(
    stats: CalibrationStatistics, keep: int | Mapping[int, int], method: str = "tcess", seed: int = 0, groups: int = 1
) -> PrunedSelection:
    """Keep the best experts of every sparse layer by `method`: `keep` in every layer, or `keep[layer]`.
    `groups` > 1 keeps the same number in each of that many expert groups."""
    if method not in MOE_METHODS:
        raise ValueError(f"unknown expert scoring method {method!r}; expected one of {', '.join(MOE_METHODS)}")
    counts = keep if isinstance(keep, Mapping) else dict.fromkeys(stats.router, keep)
    scores = {layer: router.scores(method, seed=seed + layer) for layer, router in stats.router.items()}
    kept = {layer: keep_top(layer_scores, counts[layer], groups) for layer, layer_scores in scores.items()}
    return PrunedSelection(Selection("moe_experts", kept), scores)


def keep_count(num_experts: int, top_k: int, keep_ratio: float | None = None, keep_experts: int | None = None) -> int:
    """Experts to keep per layer from a ratio or a count; never fewer than the routing's top-k."""
    if (keep_ratio is None) == (keep_experts is None):
        raise ValueError("give exactly one of a keep ratio and a number of experts to keep")
    if keep_experts is None:
        assert keep_ratio is not None
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {keep_ratio}")
        keep_experts = round(keep_ratio * num_experts)
    if not top_k <= keep_experts <= num_experts:
        raise ValueError(f"keep between {top_k} (the top-k routing) and {num_experts} experts, not {keep_experts}")
    return keep_experts


def dense_selection(
    stats: CalibrationStatistics,
    builder: VariantBuilder,
    sparsity: float,
    method: str = "seap",
    compensate: bool = True,
    skip_first: int | None = None,
    skip_last: int | None = None,
    seed: int = 0,
) -> PrunedSelection:
    """Prune the global share `sparsity` of MLP channels, spread over layers by SEAP's logistic schedule.

    The first `skip_first` and last `skip_last` layers are never pruned; by default the reference's 2 and 2
    of a 32-layer model, scaled to the model's depth (at least the first layer: early layers are the most
    sensitive), so a 4-layer model keeps its first layer whole. With `compensate`, SEAP turns the pruned
    channels' mean output into a bias; the baselines prune plainly, as weight-magnitude and random pruning do.
    """
    if method not in DENSE_METHODS:
        raise ValueError(f"unknown channel scoring method {method!r}; expected one of {', '.join(DENSE_METHODS)}")
    layers = sorted(builder.dense_layers)
    depth_share = round(2 * len(layers) / 32)
    skip_first = max(1, depth_share) if skip_first is None else skip_first
    skip_last = depth_share if skip_last is None else skip_last
    rho = logistic_schedule(len(layers), sparsity, skip_first=skip_first, skip_last=skip_last)
    kept: dict[int, list[int]] = {}
    bias: dict[int, list[float]] = {}
    scores: dict[int, torch.Tensor] = {}
    for position, layer in enumerate(layers):
        prefix = builder.dense_layers[layer].prefix
        down = builder.tensors.stored(f"{prefix}.down_proj.weight").float()
        if method in ("seap", "seap-wifn"):
            raw = channel_scores(stats.channels[layer], down, "wifv" if method == "seap" else "wifn")
            layer_scores = standardise(raw)
        elif method == "magnitude":
            gate = builder.tensors.stored(f"{prefix}.gate_proj.weight").float()
            up = builder.tensors.stored(f"{prefix}.up_proj.weight").float()
            layer_scores = down.norm(dim=0) * gate.norm(dim=1) * up.norm(dim=1)
        else:
            layer_scores = torch.rand(down.shape[1], generator=torch.Generator().manual_seed(seed + layer))
        scores[layer] = layer_scores
        if rho[position] == 0.0:
            continue
        layer_kept, pruned = prune_layer(layer_scores, rho[position])
        kept[layer] = layer_kept
        if compensate and method.startswith("seap"):
            bias[layer] = bias_compensation(down, stats.channels[layer].mean, pruned).tolist()
    return PrunedSelection(Selection("dense_channels", kept, bias), scores)
