"""Low-rank novices: what a pruned expert's choice gets beyond its mean output, as pure tensor code.

A novice stands for pruned expert j by its mean output n_j (MoNE). A low-rank novice adds a linear map of the
token, fitted on the calibration tokens the full router sent to j:

    f_j(x) = n_j + ((x - m_j) U_j) V_j^T          U_j, V_j: [hidden, r]

where m_j is the mean of those tokens and U_j V_j^T is the rank-r reduced-rank ridge regression of the expert's
outputs on its inputs (centred): the ridge solution B, projected on the top r right singular vectors V of its
fitted values X B (so U = B V). It stores 2 r + 1 vectors of the hidden size per pruned expert beside the
novice, against an expert's three matrices.

The fit needs the tokens themselves, not sums (the [hidden, hidden] moments of every expert would not fit a
large model): calibration keeps a uniform sample of at most `SAMPLES_PER_EXPERT` routed tokens per expert
(`ExpertSamples`, reservoir sampling), fits every expert when its layer is done and drops the sample. With
fewer tokens than the hidden size the ridge is solved in its dual form (a [tokens, tokens] system), so nothing
of size [hidden, hidden] is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the ridge of the fit, relative to the mean variance of the inputs
RIDGE = 1e-2
#: routed tokens kept per expert for the fit (a uniform sample of all of them), at most
SAMPLES_PER_EXPERT = 512
#: a layer's samples (every expert's inputs and outputs, float32) stay within this many bytes: a model with many
#: wide experts keeps fewer tokens per expert (DeepSeek-V3, 256 experts of hidden size 7168: 146)
SAMPLE_BYTES = 2 << 30


def samples_per_expert(num_experts: int, hidden: int) -> int:
    """How many routed tokens per expert the fit keeps: `SAMPLES_PER_EXPERT`, fewer where a layer's samples
    would pass `SAMPLE_BYTES`, never fewer than 32."""
    return max(32, min(SAMPLES_PER_EXPERT, SAMPLE_BYTES // (num_experts * 2 * hidden * 4)))


@dataclass(frozen=True)
class LowRankMaps:
    """One layer's low-rank maps, one row per expert: `means` [E, H] the inputs' means, `inputs` [E, H, r] (U),
    `outputs` [E, H, r] (V); f_j(x) = n_j + ((x - means[j]) inputs[j]) outputs[j]^T."""

    means: torch.Tensor
    inputs: torch.Tensor
    outputs: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.inputs.shape[-1])

    def rows(self, experts: list[int] | torch.Tensor) -> LowRankMaps:
        """The maps of `experts` only, in that order."""
        return LowRankMaps(self.means[experts], self.inputs[experts], self.outputs[experts])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LowRankMaps:
        return LowRankMaps(*(t.to(device, dtype) for t in (self.means, self.inputs, self.outputs)))


def low_rank_fit(x: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean of x [H], U [H, r], V [H, r]) with y - mean y ~ ((x - mean x) U) V^T: reduced-rank ridge regression
    of `y` [n, H] on `x` [n, H]. Fewer than `rank` + 1 tokens: U = V = 0 (the novice alone)."""
    hidden = x.shape[-1]
    if x.shape[0] <= rank:
        mean = x.mean(0) if x.shape[0] else torch.zeros(hidden)
        return mean.float(), torch.zeros(hidden, rank), torch.zeros(y.shape[-1], rank)
    mean_x = x.mean(0)
    xc, yc = (x - mean_x).double(), (y - y.mean(0)).double()
    n = xc.shape[0]
    ridge = RIDGE * float(xc.square().sum()) / hidden + 1e-12
    if n >= hidden:  # primal: B = (X^T X + l I)^-1 X^T Y
        b = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(hidden, dtype=xc.dtype), xc.T @ yc)
        fitted = xc @ b
    else:  # dual: B = X^T (X X^T + l I)^-1 Y, never formed
        a = torch.linalg.solve(xc @ xc.T + ridge * torch.eye(n, dtype=xc.dtype), yc)
        b = None
        fitted = (xc @ xc.T) @ a
    _, _, vh = torch.linalg.svd(fitted, full_matrices=False)
    v = vh[:rank].T  # [H_out, r]
    if v.shape[1] < rank:  # fewer directions than the rank: pad with zeros
        v = torch.cat([v, torch.zeros(v.shape[0], rank - v.shape[1], dtype=v.dtype)], dim=1)
    u = b @ v if b is not None else xc.T @ (a @ v)
    return mean_x.float(), u.float(), v.float()


class ExpertSamples:
    """A uniform sample (reservoir) of at most `capacity` routed tokens per expert: inputs and outputs."""

    def __init__(self, num_experts: int, capacity: int = SAMPLES_PER_EXPERT, seed: int = 0) -> None:
        self.num_experts = num_experts
        self.capacity = capacity
        self.seen = [0] * num_experts
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
        self.outputs: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, experts: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Routed pairs: `experts` [P] the expert of each, `inputs` and `outputs` [P, H]."""
        experts = experts.reshape(-1).cpu()
        inputs, outputs = inputs.detach().float().cpu(), outputs.detach().float().cpu()
        for expert in experts.unique().tolist():
            rows = (experts == expert).nonzero().flatten().tolist()
            for row in rows:
                self.seen[expert] += 1
                if len(self.inputs[expert]) < self.capacity:
                    self.inputs[expert].append(inputs[row])
                    self.outputs[expert].append(outputs[row])
                    continue
                slot = int(torch.randint(self.seen[expert], (1,), generator=self._generator))
                if slot < self.capacity:
                    self.inputs[expert][slot], self.outputs[expert][slot] = inputs[row], outputs[row]

    def fit(self, rank: int, hidden: int) -> LowRankMaps:
        """Every expert's low-rank map (an expert with too few tokens maps to zero)."""
        fitted = []
        for expert in range(self.num_experts):
            x = torch.stack(self.inputs[expert]) if self.inputs[expert] else torch.zeros(0, hidden)
            y = torch.stack(self.outputs[expert]) if self.outputs[expert] else torch.zeros(0, hidden)
            fitted.append(low_rank_fit(x, y, rank))
        return LowRankMaps(*(torch.stack(parts) for parts in zip(*fitted, strict=True)))
