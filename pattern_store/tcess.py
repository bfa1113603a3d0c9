"""Expert scores for PreMoe's probabilistic expert pruning, from router statistics (pure tensor code).

For one MoE layer and the T calibration tokens of a task, with g_t the router's gating weights of token t
(as the architecture computes them), Top_t the experts it selects and r_t,i = g_t,i / sum_{j in Top_t} g_t,j:

    TCESS(i) = (1/T) * sum_t g_t,i * [i in Top_t] * [r_t,i >= r]

The scores accumulate batch by batch, so calibration never holds all tokens at once. Baselines beside
TCESS: the raw-logit score of the public reference code (top-1), selection frequency, and random.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS: tuple[str, ...] = ("tcess", "tcess-logit", "frequency", "random")


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


@dataclass
class RouterStatistics:
    """Running sums per MoE layer, fed batch by batch; `scores(method)` is their per-token mean."""

    num_experts: int
    threshold: float = 0.0
    tokens: int = 0
    tcess: torch.Tensor = field(init=False)
    logit: torch.Tensor = field(init=False)
    frequency: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the TCESS confidence threshold r must lie in [0, 1], got {self.threshold}")
        self.tcess = torch.zeros(self.num_experts)
        self.logit = torch.zeros(self.num_experts)
        self.frequency = torch.zeros(self.num_experts)

    def update(self, logits: torch.Tensor, gates: torch.Tensor, top_index: torch.Tensor) -> None:
        """One batch of tokens: router logits and gating weights [T, E], selected experts [T, k]."""
        self.tcess += tcess_sums(gates, top_index, self.threshold).cpu()
        self.logit += logit_sums(logits).cpu()
        self.frequency += frequency_sums(top_index, self.num_experts).cpu()
        self.tokens += int(gates.shape[0])

    def merge(self, other: RouterStatistics) -> RouterStatistics:
        """Statistics of both token sets together (the task-agnostic baseline pools every task)."""
        merged = RouterStatistics(self.num_experts, self.threshold)
        merged.tcess = self.tcess + other.tcess
        merged.logit = self.logit + other.logit
        merged.frequency = self.frequency + other.frequency
        merged.tokens = self.tokens + other.tokens
        return merged

    def scores(self, method: str = "tcess", seed: int = 0) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen")
        if method == "tcess":
            return self.tcess / self.tokens
        if method == "tcess-logit":
            return self.logit / self.tokens
        if method == "frequency":
            return self.frequency / self.tokens
        if method == "random":
            return torch.rand(self.num_experts, generator=torch.Generator().manual_seed(seed))
        raise ValueError(f"unknown scoring method {method!r}; expected one of {', '.join(METHODS)}")


def keep_top(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring experts of one layer, in ascending id order (ties: the lower id)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} experts")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])
