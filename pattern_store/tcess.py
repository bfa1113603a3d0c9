"""Expert scores for PreMoe's probabilistic expert pruning, from router statistics (pure tensor code).

For one MoE layer and the T calibration tokens of a task, with g_t the router's gating weights of token t
(as the architecture computes them), Top_t the experts it selects and r_t,i = g_t,i / sum_{j in Top_t} g_t,j:

    TCESS(i) = (1/T) * sum_t g_t,i * [i in Top_t] * [r_t,i >= r]

The sums accumulate batch by batch (`pattern_store.expert_scores.ExpertStatistics`), so calibration never
holds all tokens at once. Baselines beside TCESS: the raw-logit score of the public reference code (top-1)
and selection frequency.
"""

from __future__ import annotations

import torch


def _selected_mask(top_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(top_index.shape[0], num_experts, dtype=torch.bool, device=top_index.device)
    return mask.scatter_(1, top_index, True)


def tcess_sums(gates: torch.Tensor, top_index: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """sum_t g_t,i [i in Top_t] [r_t,i >= r] over the tokens of `gates` [T, E] and `top_index` [T, k]."""
    gates = gates.float()
    selected = _selected_mask(top_index, gates.shape[1])
    chosen = gates * selected
    relative = chosen / chosen.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (chosen * (relative >= threshold)).sum(dim=0)


def logit_sums(logits: torch.Tensor) -> torch.Tensor:
    """The public reference code's score: the raw router logit of each token's top-1 expert, summed."""
    top = logits.float().argmax(dim=1)
    return torch.zeros(logits.shape[1], dtype=torch.float32, device=logits.device).index_add_(
        0, top, logits.float().gather(1, top[:, None])[:, 0]
    )


def frequency_sums(top_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How often each expert is selected."""
    return _selected_mask(top_index, num_experts).sum(dim=0).float()
