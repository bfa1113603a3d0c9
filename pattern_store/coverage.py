"""Coverage: how much of the full router's choice a pattern keeps, token by token.

For one token at one sparse layer, the full router picks its top-k experts with gate weights g_1..g_k.
The pattern's coverage of that token is the share of that gate mass on experts the pattern keeps,
sum(g_i for kept i) / sum(g_i), and its top-1 coverage is 1 when the full router's heaviest expert is kept.
A pattern calibrated on a task covers that task's tokens well (it kept the experts the task routes to);
traffic of another task routes elsewhere, and its coverage drops. Calibration records the figure on the
calibration tokens (`calibrated_coverage`); the server samples it on the tokens it serves (the pool's
`CoverageMeter`), and a pattern whose live coverage falls clearly below its calibrated one no longer fits
its traffic.

Pure tensor code: no model, no server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def token_coverage(
    weights: torch.Tensor, experts: torch.Tensor, pruned: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (the share of its top-k gate mass on kept experts, 1.0 if its top-1 expert is kept).

    `weights` and `experts` [T, k] are the full router's gate weights and choices, `pruned` [T, E] is True
    on each token's pruned experts."""
    weights = weights.float().abs()  # a gate weight is never negative; abs guards odd routing rules
    kept = ~pruned.gather(1, experts.long())
    mass = (weights * kept).sum(-1) / weights.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    top1 = kept.gather(1, weights.argmax(-1, keepdim=True)).squeeze(1).float()
    return mass, top1


def gate_mass_sums(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, over a batch of tokens: the sum of its share of each token's top-k gate mass, and how
    often it is a token's top-1. Summed over tokens they give any expert set's coverage (`calibrated_coverage`)."""
    weights = weights.float().abs()
    share = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    mass = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    mass.index_add_(0, experts.reshape(-1).long(), share.reshape(-1))
    top = experts.gather(1, weights.argmax(-1, keepdim=True)).reshape(-1).long()
    top1 = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    top1.index_add_(0, top, torch.ones_like(top, dtype=torch.float32))
    return mass, top1


def calibrated_coverage(
    mass: Mapping[int, torch.Tensor],
    top1: Mapping[int, torch.Tensor],
    tokens: int,
    kept: Mapping[int, Sequence[int]],
    answers: tuple[Mapping[int, torch.Tensor], Mapping[int, torch.Tensor], int] | None = None,
) -> dict[str, object]:
    """The coverage of the kept experts on the calibration tokens, per sparse layer and overall (the mean
    over the layers): what a pattern records. `answers`: the same sums over the answers' tokens only; when
    they hold any, the record's `answers` entry gives their coverage, which is what a server's live
    coverage of generated tokens is compared with (`reference_coverage`). A layer the selection does not
    name keeps every expert (coverage 1)."""
    if tokens <= 0:
        raise ValueError("no calibration tokens to measure coverage on")
    record = _coverage_of(mass, top1, tokens, kept)
    if answers is not None and answers[2] > 0:
        record["answers"] = _coverage_of(*answers, kept)
    return record


def reference_coverage(record: Mapping[str, object] | None) -> float | None:
    """The calibrated figure live coverage is judged against: the answers' coverage when the pattern
    recorded it (generated tokens are compared with answer tokens), else the coverage over every token."""
    if not isinstance(record, Mapping):
        return None
    answers = record.get("answers")
    value = answers.get("mass") if isinstance(answers, Mapping) else record.get("mass")
    return float(value) if isinstance(value, int | float) else None


def _coverage_of(
    mass: Mapping[int, torch.Tensor], top1: Mapping[int, torch.Tensor], tokens: int, kept: Mapping[int, Sequence[int]]
) -> dict[str, object]:
    layers: dict[str, dict[str, float]] = {}
    for layer in sorted(mass):
        experts = list(kept.get(layer, range(mass[layer].numel())))
        layers[str(layer)] = {
            "mass": round(float(mass[layer][experts].sum()) / tokens, 6),
            "top1": round(float(top1[layer][experts].sum()) / tokens, 6),
        }
    count = max(len(layers), 1)
    return {
        "mass": round(sum(entry["mass"] for entry in layers.values()) / count, 6),
        "top1": round(sum(entry["top1"] for entry in layers.values()) / count, 6),
        "tokens": tokens,
        "layers": layers,
    }
