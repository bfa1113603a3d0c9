"""Layer-local refinement of an expert selection: swap experts while the MoE block's output error drops.

Scores rank experts one at a time; what a layer computes depends on the set. In a second layer-streamed
pass over the calibration tokens (any model size: one layer in memory at a time), each MoE block's output
with every expert (the target) is compared with its output when the router may only choose the kept experts:
the relative squared error over the tokens (Lu et al. 2024 choose experts by this error). The search starts
from the scoring method whose selection has the lowest error in that layer and swaps a kept expert for a
pruned one while the error drops. Tokens reach each layer through the layers refined before it, as they will
in the variant.

Candidates are scored by `BlockReconstruction`: every expert's output on the sampled tokens is computed once
(by the experts module's own code), and the block's router restricted to the candidate (`masking`) says which
of them each token combines, so a candidate costs one router pass and a gather.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pattern_store.selection import SelectionError
from server.model.calibrate import expert_outputs
from server.model.families import Family
from server.model.layer_stream import LayerStream, Progress, StreamedLayers
from server.model.masking import RouterMasks, full_router, restricted_router
from server.model.novices import NoviceMasks, NoviceTable, substituted_mask
from server.model.variant import VariantBuilder

Kept = tuple[int, ...]


@dataclass(frozen=True)
class SearchOptions:
    """How hard the swap searches look. The answer-loss search is bounded by a number of forward passes, so
    that its result does not depend on how fast (or how loaded) the machine is; the seconds are only a
    safety cap, and the pattern records when it was hit."""

    candidates: int = 8  # per swap: the kept experts that cost least and the pruned ones that help most
    max_swaps: int = 16  # per layer and pass
    max_tokens: int = 4096  # tokens sampled per layer for the reconstruction error
    max_cache_bytes: int = 512 << 20  # every expert's output on those tokens (float32); about twice this at peak
    e2e_pairs: int = 6  # answer loss: swaps (ranked by the layer-local error) given a forward pass each
    e2e_sweeps: int = 2  # answer loss: passes over the layers
    e2e_evaluations: int = 400  # answer loss: forward passes in all
    e2e_seconds: float = 900.0  # answer loss: safety cap on wall time
    e2e_objective: str = "divergence"  # answer loss: from the full model, or "answers" (their cross-entropy)
    move_pairs: int = 2  # budget moves: additions and removals per layer given a forward pass each
    move_trials: int = 12  # budget moves: (addition, removal) pairs in two layers tried per move


@dataclass
class LayerSearch:
    """What a swap search did in one layer."""

    start: str  # the method whose selection it started from
    kept: Kept
    start_loss: float
    loss: float
    swaps: int
    method_losses: dict[str, float] = field(default_factory=dict)


class BlockReconstruction:
    """One MoE block on a sample of tokens: the block's routed output with every expert, each expert's output
    on every token, and the routed output under any kept set (the block's own router, restricted)."""

    def __init__(
        self,
        block: nn.Module,
        family: Family,
        config: Any,
        layer: int,
        inputs: torch.Tensor,  # [N, H]: the MoE block's input (after its layer norm)
        target: torch.Tensor,  # [N, H]: the routed experts' output with every expert
        novices: NoviceTable | None = None,  # every expert's novice, when pruned choices get novices
    ) -> None:
        self.block, self.family, self.config, self.layer = block, family, config, layer
        self.inputs = inputs
        self.target = target.float()
        self.num_experts = int(block.experts.num_experts)
        self.groups = family.balanced_groups(config) if novices is None else 1  # novices: any kept set routes
        n = inputs.shape[0]
        ids = torch.arange(self.num_experts, device=inputs.device).repeat(n)
        with torch.inference_mode():
            outputs = expert_outputs(block.experts, inputs.repeat_interleave(self.num_experts, dim=0), ids)
        self.outputs = outputs.float().view(n, self.num_experts, -1)  # [N, E, H]
        #: [N, E, H]: every expert's novice on every token (a constant, or with a low-rank map of the token)
        self.novices = None if novices is None else novices.to(inputs.device, torch.float32).values(inputs.float())
        self.scale = float(self.target.square().sum()) or 1.0
        self._errors: dict[Kept, float] = {}
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    def error(self, kept: Kept) -> float:
        """Relative squared error of the routed output when only `kept` may be chosen; inf if the routing rule
        forbids that selection (DeepSeek-V3's groups)."""
        if kept not in self._errors:
            self._errors[kept] = self._error(kept)
        return self._errors[kept]

    @torch.inference_mode()
    def _error(self, kept: Kept) -> float:
        if len(kept) < int(self.config.num_experts_per_tok):
            return math.inf
        if len(kept) == self.num_experts or self.novices is not None:
            weights, index = self._full_choice()
        else:
            try:
                overrides = self.family.routing_overrides(self.config, self.layer, kept)
            except SelectionError:
                return math.inf
            router = restricted_router(self.block, self.family, kept, overrides)
            _, weights, positions = router(self.inputs)
            index = torch.tensor(kept, device=positions.device)[positions]  # [N, k] expert ids
        chosen = self.outputs.gather(1, index[..., None].expand(-1, -1, self.outputs.shape[-1]))  # [N, k, H]
        if self.novices is not None and len(kept) < self.num_experts:  # pruned choices answered by novices
            substituted = substituted_mask(kept, self.num_experts, index.device)[index]
            novices = self.novices.gather(1, index[..., None].expand(-1, -1, self.novices.shape[-1]))
            chosen = torch.where(substituted[..., None], novices, chosen)
        approx = (weights.float()[..., None] * chosen).sum(1)
        return float((approx - self.target).square().sum()) / self.scale

    def _full_choice(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full router's gate weights and choices on the sampled tokens, run once: the same for every
        candidate that keeps every expert or answers its pruned choices by novices."""
        if self._full is None:
            _, weights, index = full_router(self.block, self.family)(self.inputs)
            self._full = (weights, index)
        return self._full

    def _group(self, expert: int) -> int:
        return expert * self.groups // self.num_experts

    def ranked_swaps(self, kept: Kept, scores: torch.Tensor, candidates: int) -> list[tuple[float, Kept]]:
        """Swaps of one kept expert for one pruned expert, best first, with their errors. The kept experts
        considered are those whose removal costs least, the pruned ones those whose addition helps most; with
        balanced expert groups (where one removal alone breaks the rule) the candidates are ranked by score
        and a swap stays within its group."""
        pruned = [e for e in range(self.num_experts) if e not in kept]
        if not pruned:
            return []

        def swap(out: int, add: int) -> Kept:
            return tuple(sorted((*(e for e in kept if e != out), add)))

        pairs: list[tuple[int, int]] = []
        for group in range(self.groups):
            group_kept = [e for e in kept if self._group(e) == group]
            group_pruned = [e for e in pruned if self._group(e) == group]
            if self.groups == 1:
                removal = {e: self.error(tuple(x for x in kept if x != e)) for e in group_kept}
                addition = {e: self.error(tuple(sorted((*kept, e)))) for e in group_pruned}
            else:
                removal = addition = dict.fromkeys(range(self.num_experts), 0.0)
            outs = sorted(group_kept, key=lambda e: (removal[e], float(scores[e]), e))[:candidates]
            ins = sorted(group_pruned, key=lambda e: (addition[e], -float(scores[e]), e))[:candidates]
            pairs += [(out, add) for out in outs for add in ins]
        swaps = [(self.error(swap(out, add)), swap(out, add)) for out, add in pairs]
        return sorted(swap for swap in swaps if math.isfinite(swap[0]))

    def ranked_resizes(self, kept: Kept, scores: torch.Tensor, grow: bool, candidates: int) -> list[Kept]:
        """The kept set with one pruned expert added (`grow`) or one kept expert removed, best first by the
        error (ties by score), at most `candidates` of them; a removal below the routing's top-k is none."""
        changed = [e for e in range(self.num_experts) if e not in kept] if grow else list(kept)

        def resized(e: int) -> Kept:
            return tuple(sorted((*kept, e))) if grow else tuple(x for x in kept if x != e)

        ranked = sorted((self.error(resized(e)), -float(scores[e]) if grow else float(scores[e]), e) for e in changed)
        return [resized(e) for error, _, e in ranked if math.isfinite(error)][:candidates]

    def search(self, kept: Kept, scores: torch.Tensor, options: SearchOptions) -> tuple[Kept, float, int]:
        """Best-improvement swaps while the error drops; returns the kept set, its error and the swaps made."""
        error = self.error(kept)
        swaps = 0
        while swaps < options.max_swaps:
            ranked = self.ranked_swaps(kept, scores, options.candidates)
            if not ranked or ranked[0][0] >= error * (1 - 1e-6):
                break
            error, kept = ranked[0]
            swaps += 1
        return kept, error, swaps


class BlockCapture:
    """Collects one MoE block's inputs and routed outputs (real tokens only) while a layer runs:
    `with BlockCapture(block, stream) as capture: ...; x, y = capture.sample(n, seed)`."""

    def __init__(self, block: nn.Module, stream: LayerStream) -> None:
        self.block = block
        self.stream = stream
        self.inputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.handle: Any = None

    def __enter__(self) -> BlockCapture:
        self.handle = self.block.experts.register_forward_hook(self.on_experts)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def on_experts(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        real = self.stream.current.real.to(output.device)
        self.inputs.append(args[0][real])
        self.targets.append(output[real])

    def sample(self, max_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = torch.cat(self.inputs), torch.cat(self.targets)
        if inputs.shape[0] > max_tokens:
            keep = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
            inputs, targets = inputs[keep.to(inputs.device)], targets[keep.to(inputs.device)]
        return inputs, targets


def token_budget(options: SearchOptions, num_experts: int, hidden: int, novices: bool = False) -> int:
    """Tokens whose every-expert outputs (and with `novices`, every expert's novice) fit the cache budget
    (float32)."""
    copies = 2 if novices else 1
    return max(1, min(options.max_tokens, options.max_cache_bytes // (copies * num_experts * hidden * 4)))


def refine_locally(
    builder: VariantBuilder,
    token_ids: Sequence[Sequence[int]],
    starts: Mapping[str, Mapping[int, Sequence[int]]],
    tiebreak: Mapping[int, torch.Tensor],
    options: SearchOptions | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    after_layer: Callable[[int], None] | None = None,
    novices: Mapping[int, NoviceTable] | None = None,
) -> dict[int, LayerSearch]:
    """Layer-local refinement in a layer-streamed pass (a model larger than memory works).

    `starts` maps each scoring method to its selection (kept experts per sparse layer, the same count per
    layer for every method); in every layer the search starts from the method with the lowest reconstruction
    error there, and `tiebreak` scores order the swaps the error cannot rank. Returns each sparse layer's search.
    """
    if not starts:
        raise ValueError("local refinement needs at least one starting selection")
    options = options or SearchOptions()
    streamed = StreamedLayers(builder.layout, builder.tensors, token_ids, batch_size)
    result: dict[int, LayerSearch] = {}
    with torch.inference_mode():
        for index in streamed.layers(progress, after_layer):
            if index in builder.sparse_layers:
                table = novices.get(index) if novices is not None else None
                result[index] = _refine_layer(builder, streamed, index, starts, tiebreak[index], options, table)
            else:
                streamed.stream.run_layer(index)
    return result


def _refine_layer(
    builder: VariantBuilder,
    streamed: StreamedLayers,
    index: int,
    starts: Mapping[str, Mapping[int, Sequence[int]]],
    tiebreak: torch.Tensor,
    options: SearchOptions,
    novices: NoviceTable | None = None,
) -> LayerSearch:
    """Search sparse layer `index` (its weights read) on the tokens that reach it, then run it with the refined
    selection: the next layer sees this layer's refined output."""
    sparse, stream = builder.sparse_layers[index], streamed.stream
    block = streamed.model.get_submodule(sparse.prefix)
    inputs = [batch.hidden for batch in stream.batches]
    with BlockCapture(block, stream) as capture:
        stream.run_layer(index)
    budget = token_budget(options, sparse.num_experts, int(builder.config.hidden_size), novices is not None)
    x, y = capture.sample(budget, seed=index)
    del capture
    reconstruction = BlockReconstruction(block, builder.family, builder.config, index, x, y, novices)
    losses = {method: reconstruction.error(tuple(sorted(selection[index]))) for method, selection in starts.items()}
    method = min(losses, key=lambda m: (losses[m], m))
    refined, error, swaps = reconstruction.search(tuple(sorted(starts[method][index])), tiebreak, options)
    del reconstruction
    masks = (
        RouterMasks(streamed.model, builder.family, builder.config, {index: sparse.prefix})
        if novices is None
        else NoviceMasks(streamed.model, {index: sparse.prefix}, {index: novices.to(x.device, x.dtype)})
    )
    masks.apply({index: refined})
    with masks:
        stream.run_layer(index, inputs)
    return LayerSearch(method, refined, losses[method], error, swaps, losses)
