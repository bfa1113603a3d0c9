"""Channel scores and the layer schedule of SEAP (sparse expert activation pruning), as pure tensor code.

Per layer l and MLP channel j, the statistics of the activation entering `down_proj`
(a = act(gate(x)) * up(x)) over a task's calibration tokens score the channel:

    WIFV: s_j = Var(a_j) * ||W_down[:, j]||^2          WIFN: s_j = sqrt(mean a_j^2) * ||W_down[:, j]||

Scores are standardised per layer (median and interquartile range, clipped). The global sparsity G is
spread over layers by a logistic schedule (the first m and last n layers untouched), Lambda found by
bisection so the mean sparsity over all layers is G. The removed channels' mean contribution is
compensated by a bias on `down_proj`: b = W_down[:, pruned] @ mean(a_pruned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SCORES: tuple[str, ...] = ("wifv", "wifn")


@dataclass
class ChannelStatistics:
    """Running sums of one layer's `down_proj` input, fed batch by batch (float64 for stable variance)."""

    channels: int
    tokens: int = 0
    total: torch.Tensor = field(init=False)
    total_squares: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.channels, dtype=torch.float64)
        self.total_squares = torch.zeros(self.channels, dtype=torch.float64)

    def update(self, activations: torch.Tensor) -> None:
        """Activations [..., channels] of real (not padding) tokens."""
        flat = activations.reshape(-1, self.channels).double().cpu()
        self.total += flat.sum(0)
        self.total_squares += flat.square().sum(0)
        self.tokens += flat.shape[0]

    def merge(self, other: ChannelStatistics) -> ChannelStatistics:
        merged = ChannelStatistics(self.channels)
        merged.total = self.total + other.total
        merged.total_squares = self.total_squares + other.total_squares
        merged.tokens = self.tokens + other.tokens
        return merged

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).float()

    @property
    def mean_square(self) -> torch.Tensor:
        return (self.total_squares / max(self.tokens, 1)).float()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance E[a^2] - E[a]^2, never negative."""
        mean = self.total / max(self.tokens, 1)
        return (self.total_squares / max(self.tokens, 1) - mean.square()).clamp_min(0.0).float()


def channel_scores(stats: ChannelStatistics, down_weight: torch.Tensor, score: str = "wifv") -> torch.Tensor:
    """WIFV or WIFN score of every channel; `down_weight` is W_down [hidden, channels]."""
    column_norm_sq = down_weight.float().square().sum(dim=0)
    if score == "wifv":
        return stats.variance * column_norm_sq
    if score == "wifn":
        return stats.mean_square.sqrt() * column_norm_sq.sqrt()
    raise ValueError(f"unknown SEAP score {score!r}; expected one of {', '.join(SCORES)}")


def standardise(scores: torch.Tensor, clip: float = 3.0) -> torch.Tensor:
    """(s - median) / IQR, clipped to [-clip, clip]: comparable across layers, robust to outliers."""
    scores = scores.float()
    q1, median, q3 = torch.quantile(scores, torch.tensor([0.25, 0.5, 0.75]))  # torch.median takes the lower middle
    spread = (q3 - q1).clamp_min(1e-12)
    return ((scores - median) / spread).clamp(-clip, clip)


def logistic_schedule(
    num_layers: int,
    sparsity: float,
    skip_first: int = 2,
    skip_last: int = 2,
    steepness: float = 1.0,
    midpoint: float = 0.3,
    max_layer_sparsity: float = 0.99,
) -> list[float]:
    """Per-layer sparsity rho_l = Lambda / (1 + exp(-k (x_l - x0))), mean over all layers = `sparsity`.

    x_l is the layer's position scaled to [0, 1]; the first `skip_first` and last `skip_last` layers get 0.
    Lambda is found by bisection; each rho_l is capped at `max_layer_sparsity`. A sparsity the prunable
    layers cannot carry under that cap is an error, not a silently smaller one.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    prunable = [i for i in range(num_layers) if skip_first <= i < num_layers - skip_last]
    if sparsity == 0.0:
        return [0.0] * num_layers
    if not prunable:
        raise ValueError(
            f"no layer can be pruned: {num_layers} layers, the first {skip_first} and last {skip_last} are kept"
        )
    position = [i / max(num_layers - 1, 1) for i in range(num_layers)]
    weight = [1.0 / (1.0 + math.exp(-steepness * (position[i] - midpoint))) for i in range(num_layers)]

    def schedule(scale: float) -> list[float]:
        return [min(scale * weight[i], max_layer_sparsity) if i in prunable else 0.0 for i in range(num_layers)]

    ceiling = sum(schedule(1e9)) / num_layers
    if sparsity > ceiling + 1e-9:
        raise ValueError(
            f"a global sparsity of {sparsity:.2f} needs more than the {len(prunable)} prunable layers of "
            f"{num_layers} can give (at most {ceiling:.2f}); keep fewer layers unpruned"
        )
    low, high = 0.0, 1.0
    while sum(schedule(high)) / num_layers < sparsity:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if sum(schedule(middle)) / num_layers < sparsity:
            low = middle
        else:
            high = middle
    return schedule(high)


def prune_layer(scores: torch.Tensor, layer_sparsity: float) -> tuple[list[int], list[int]]:
    """(kept, pruned) channel ids: the `layer_sparsity` share with the lowest scores is pruned."""
    channels = scores.numel()
    n_pruned = min(round(layer_sparsity * channels), channels - 1)
    order = sorted(range(channels), key=lambda j: (float(scores[j]), j))
    pruned = sorted(order[:n_pruned])
    kept = sorted(order[n_pruned:])
    return kept, pruned


def bias_compensation(down_weight: torch.Tensor, mean_activation: torch.Tensor, pruned: list[int]) -> torch.Tensor:
    """b = W_down[:, pruned] @ mean(a_pruned): what the removed channels add on average."""
    if not pruned:
        return torch.zeros(down_weight.shape[0])
    return down_weight.float()[:, pruned] @ mean_activation.float()[pruned]
