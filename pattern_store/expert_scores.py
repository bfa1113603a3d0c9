"""Expert scores of one MoE layer from calibration statistics, and the rules that turn scores into kept experts.

Pure tensor code: the calibration pass (`server.model.calibrate`) feeds one batch of routed tokens at a
time, this module keeps the running sums. Two families of scores:

- routing scores, from the router alone (`pattern_store.tcess`): TCESS, the reference code's raw logit,
  selection frequency;
- output-aware scores, which also look at what an expert writes. For expert j over the tokens routed to
  it, with g_j(x) the gate weight the router gives it, E_j(x) its output, and h_in / h_out the residual
  stream before and after the routed experts are added:

      reap(j)    = mean over routed x of g_j(x) * ||E_j(x)||          (Lasby et al. 2025)
      ean(j)     = (1/T) sum over routed x of ||E_j(x)||               (expert activation norm)
      easy-ep(j) = (1/T) sum over routed x of g_j(x) * ||E_j(x)|| * max(1 - cos(h_in, h_out), 0)   (EASY-EP 2025)

  TCESS ranks experts by routing mass, so it drops experts that are rarely chosen but write large outputs;
  these scores keep them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from pattern_store.coverage import gate_mass_sums
from pattern_store.recipes import MOE_METHODS, OUTPUT_METHODS
from pattern_store.substitutes import ExpertSamples, LowRankMaps
from pattern_store.tcess import frequency_sums, logit_sums, tcess_sums


def output_sums(
    weights: torch.Tensor, top_index: torch.Tensor, norms: torch.Tensor, change: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per expert, over one batch of T tokens: sum of g*||E||, sum of ||E||, sum of g*||E||*max(1-cos, 0).

    `weights` [T, k] are the gate weights the router gave its `top_index` [T, k] selections, `norms` [T, k]
    the L2 norms of those experts' outputs, `change` [T] each token's 1 - cos(h_in, h_out).
    """
    weighted = (weights.float() * norms.float()).reshape(-1)
    index = top_index.reshape(-1)
    token_change = change.float().clamp_min(0.0)[:, None].expand_as(norms).reshape(-1)

    def per_expert(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_experts, dtype=torch.float32, device=values.device).index_add_(0, index, values)

    return per_expert(weighted), per_expert(norms.float().reshape(-1)), per_expert(weighted * token_change)


SUMS = ("tcess", "logit", "frequency", "reap", "ean", "easy_ep", "mass", "top1", "answer_mass", "answer_top1")
"""The per-expert running sums of `ExpertStatistics`."""


@dataclass
class ExpertStatistics:
    """Running sums of one MoE layer over a task's calibration tokens; `scores(method)` turns them into scores."""

    num_experts: int
    threshold: float = 0.0  # TCESS's confidence threshold r
    tokens: int = 0
    tcess: torch.Tensor = field(init=False)
    logit: torch.Tensor = field(init=False)
    frequency: torch.Tensor = field(init=False)
    reap: torch.Tensor = field(init=False)
    ean: torch.Tensor = field(init=False)
    easy_ep: torch.Tensor = field(init=False)
    mass: torch.Tensor = field(init=False)  # per expert: its share of each token's top-k gate mass, summed
    top1: torch.Tensor = field(init=False)  # per expert: tokens whose heaviest choice it is
    answer_mass: torch.Tensor = field(init=False)  # `mass` and `top1` over the answers' tokens only
    answer_top1: torch.Tensor = field(init=False)
    answer_tokens: int = 0
    has_outputs: bool = False
    #: [E, H] per expert: the sum of its outputs E_j(x) (weight 1) over the tokens routed to it (novices)
    output_sum: torch.Tensor | None = None
    #: a sample of each expert's routed tokens, kept while the layer runs when low-rank novices are wanted
    samples: ExpertSamples | None = None
    #: each expert's low-rank map, fitted on `samples` when the layer is done (`fit_low_rank`)
    low_rank: LowRankMaps | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the TCESS confidence threshold r must lie in [0, 1], got {self.threshold}")
        for name in SUMS:
            setattr(self, name, torch.zeros(self.num_experts))

    def update_weights(
        self, weights: torch.Tensor, top_index: torch.Tensor, answer: torch.Tensor | None = None
    ) -> None:
        """The same batch's gate weights [T, k] of the selections [T, k] (the routing the model applies):
        the sums coverage is computed from (`pattern_store.coverage`). `answer` [T] marks the tokens of the
        calibration answers, which also feed the answer sums: a served pattern's live coverage is measured on
        the tokens it generates, and the prompt's tokens (the chat template's among them) cover differently."""
        mass, top1 = gate_mass_sums(weights, top_index, self.num_experts)
        self.mass += mass.cpu()
        self.top1 += top1.cpu()
        if answer is not None and bool(answer.any()):
            mass, top1 = gate_mass_sums(weights[answer], top_index[answer], self.num_experts)
            self.answer_mass += mass.cpu()
            self.answer_top1 += top1.cpu()
            self.answer_tokens += int(answer.sum())

    def update(self, logits: torch.Tensor, gates: torch.Tensor, top_index: torch.Tensor) -> None:
        """One batch of tokens as the router saw it: logits and gating weights [T, E], selections [T, k]."""
        self.tcess += tcess_sums(gates, top_index, self.threshold).cpu()
        self.logit += logit_sums(logits).cpu()
        self.frequency += frequency_sums(top_index, self.num_experts).cpu()
        self.tokens += int(gates.shape[0])

    def update_outputs(
        self,
        weights: torch.Tensor,
        top_index: torch.Tensor,
        norms: torch.Tensor,
        change: torch.Tensor,
        outputs: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
    ) -> None:
        """The same batch as the experts saw it (see `output_sums`); `outputs` [T*k, H] are the selected
        experts' outputs themselves, row t*k+i for `top_index[t, i]`, summed per expert for its novice, and
        `inputs` [T*k, H] the tokens they saw (sampled for the low-rank novices, when `samples` is set)."""
        reap, ean, easy_ep = output_sums(weights, top_index, norms, change, self.num_experts)
        self.reap += reap.cpu()
        self.ean += ean.cpu()
        self.easy_ep += easy_ep.cpu()
        self.has_outputs = True
        if outputs is not None:
            if self.output_sum is None:
                self.output_sum = torch.zeros(self.num_experts, outputs.shape[-1])
            sums = torch.zeros(self.output_sum.shape, device=outputs.device)
            self.output_sum += sums.index_add_(0, top_index.reshape(-1), outputs.float()).cpu()
            if self.samples is not None and inputs is not None:
                self.samples.add(top_index.reshape(-1), inputs, outputs)

    def fit_low_rank(self, rank: int) -> None:
        """Fit every expert's low-rank map on its sampled tokens, then drop the sample (its layer is done)."""
        if self.samples is None or self.output_sum is None:
            raise ValueError("low-rank novices need the experts' sampled tokens, which this calibration did not keep")
        self.low_rank = self.samples.fit(rank, self.output_sum.shape[1])
        self.samples = None

    def novices(self) -> torch.Tensor:
        """[E, H]: each expert's novice, its mean output over the calibration tokens the full router sent to it
        (MoNE); zeros for an expert no token was sent to (nothing to stand in for)."""
        if self.output_sum is None:
            raise ValueError("novices need the experts' outputs, which this calibration did not collect")
        return self.output_sum / self.frequency.clamp_min(1.0)[:, None]

    def merge(self, other: ExpertStatistics) -> ExpertStatistics:
        """Statistics of both token sets together (the task-agnostic baseline pools every task)."""
        merged = ExpertStatistics(self.num_experts, self.threshold)
        for name in SUMS:
            setattr(merged, name, getattr(self, name) + getattr(other, name))
        merged.tokens = self.tokens + other.tokens
        merged.answer_tokens = self.answer_tokens + other.answer_tokens
        merged.has_outputs = self.has_outputs and other.has_outputs
        if self.output_sum is not None and other.output_sum is not None:
            merged.output_sum = self.output_sum + other.output_sum
        return merged

    def scores(self, method: str = "tcess", seed: int = 0) -> torch.Tensor:
        """One score per expert; higher is more worth keeping."""
        if method == "random":
            return torch.rand(self.num_experts, generator=torch.Generator().manual_seed(seed))
        if method not in MOE_METHODS:
            raise ValueError(f"unknown scoring method {method!r}; expected one of {', '.join(MOE_METHODS)}")
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen")
        if method in OUTPUT_METHODS and not self.has_outputs:
            raise ValueError(f"method {method!r} needs expert outputs, which this calibration did not collect")
        if method == "tcess":
            return self.tcess / self.tokens
        if method == "tcess-logit":
            return self.logit / self.tokens
        if method == "frequency":
            return self.frequency / self.tokens
        if method == "reap":
            return self.reap / self.frequency.clamp_min(1.0)  # mean over the tokens routed to each expert
        if method == "ean":
            return self.ean / self.tokens
        return self.easy_ep / self.tokens


def keep_top(scores: torch.Tensor, keep: int, groups: int = 1) -> list[int]:
    """The `keep` highest-scoring experts of one layer, in ascending id order (ties: the lower id).

    With `groups` > 1 the experts form that many equal consecutive groups and each group keeps the same
    number, `keep / groups`, of its best: group-limited routing (DeepSeek-V3) stays exact only then.
    """
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} experts")
    if groups > 1:
        if keep % groups or scores.numel() % groups:
            raise ValueError(f"keeping {keep} of {scores.numel()} experts cannot be split evenly over {groups} groups")
        size = scores.numel() // groups
        return sorted(
            group * size + index
            for group in range(groups)
            for index in keep_top(scores[group * size : (group + 1) * size], keep // groups)
        )
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def layer_budget(
    scores: Mapping[int, torch.Tensor], total: int, minimum: int, step: int = 1, maximum: int | None = None
) -> dict[int, int]:
    """How many experts each layer keeps when the layers share `total` kept experts by what their scores ask.

    Each layer's scores are normalised to shares of the layer's total, and experts are granted one `step` at
    a time to the layer whose next experts carry the largest share: a layer whose importance sits in a few
    experts gets few, a layer that spreads it gets many. Every layer keeps at least `minimum` (the routing's
    top-k) and at most all its experts; `step` keeps counts multiples of the expert groups.
    """
    layers = sorted(scores)
    if not layers:
        return {}
    sizes = {layer: scores[layer].numel() for layer in layers}
    ceiling = {layer: min(sizes[layer], maximum or sizes[layer]) for layer in layers}
    counts = {layer: minimum for layer in layers}
    if (total - minimum * len(layers)) % step:
        raise ValueError(f"{total} kept experts cannot be spread over {len(layers)} layers in steps of {step}")
    if total < minimum * len(layers) or total > sum(ceiling.values()):
        raise ValueError(
            f"{total} kept experts cannot be spread over {len(layers)} layers with {minimum} to "
            f"{min(ceiling.values())} each"
        )
    ordered = {}
    for layer in layers:
        values = scores[layer].double().clamp_min(0.0)
        share = values / values.sum() if float(values.sum()) > 0 else torch.full_like(values, 1.0 / values.numel())
        ordered[layer] = share.sort(descending=True).values
    remaining = total - sum(counts.values())

    def next_share(layer: int) -> float:
        if counts[layer] + step > ceiling[layer]:
            return -1.0
        return float(ordered[layer][counts[layer] : counts[layer] + step].sum())

    while remaining > 0:
        best = max(layers, key=lambda layer: (next_share(layer), -counts[layer], -layer))  # ties: the smaller layer
        if next_share(best) < 0:
            raise ValueError(f"cannot place {remaining} more kept experts in steps of {step}")
        counts[best] += step
        remaining -= step
    return counts
