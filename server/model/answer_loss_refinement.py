"""End-to-end refinement of an expert selection by the calibration exchanges' answer loss.

When the model fits in memory, the loss that matters can be measured directly on the answer tokens of the
task's calibration exchanges, with the routers restricted to a candidate selection (`masking.RouterMasks`:
exactly the variant's computation, nothing built or read). The loss is the divergence from the full model:
the KL divergence of the variant's next-token distribution from the full model's, over the full model's
`TOP_TOKENS` likeliest tokens at each answer position (`"divergence"`, the default), or the cross-entropy of
the exchanges' own answer tokens (`"answers"`). The cross-entropy can be driven below the full model's on 64
exchanges while held-out answers get worse (demo-moe, translate at half the experts: the shipped pattern
recorded 0.0144 against the full model's 0.0226, and answered 91% of choice-split prompts right against the
full model's 96%); the divergence measures what a variant is for, answering as the full model does (94.5%,
and 98% with the budget moved; `scripts/choose_refinement.py`).

The search chooses among candidate selections (every score's, and the layer-local refinement's), then swaps
a kept expert for a pruned one, layer by layer, while that loss drops; with `move_budget` it then moves
kept-expert slots from layer to layer (the total stays) and swaps again. The layer-local reconstruction
error ranks which changes get a forward pass, and the inputs of every layer are cached for the current
selection, so a change in layer l reruns layers l.. only. The search is bounded by a number of forward
passes (reproducible on any machine).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from server.model.layer_stream import LayerStream, Progress
from server.model.local_refinement import BlockCapture, BlockReconstruction, Kept, SearchOptions, token_budget
from server.model.masking import RouterMasks
from server.model.novices import NoviceMasks, NoviceTable
from server.model.variant import VariantBuilder

IGNORE = -100
#: the full model's likeliest next tokens whose probabilities the divergence compares (a large vocabulary's
#: whole distribution at every answer position would not fit; the rest carries little of its mass)
TOP_TOKENS = 64
#: what the answer loss measures: the divergence from the full model, or the cross-entropy of the answers
OBJECTIVES: tuple[str, ...] = ("divergence", "answers")


@dataclass
class AnswerLossSearch:
    """What the end-to-end search did: the losses of the candidates, the chosen start, the swaps."""

    start: str
    kept: dict[int, Kept]
    start_loss: float
    loss: float
    full_loss: float
    swaps: int
    candidate_losses: dict[str, float]
    evaluations: int
    seconds: float
    stopped: str  # "converged", "evaluations" (the budget of forward passes) or "seconds" (the safety cap)
    moves: int = 0  # kept-expert slots moved from one layer to another (`move_budget`)


class AnswerLoss:
    """Mean loss per answer token of calibration exchanges under masked routing (`objective`: the divergence
    from the full model or the answers' cross-entropy), with the inputs of every layer cached for the current
    selection."""

    def __init__(
        self,
        builder: VariantBuilder,
        token_ids: Sequence[Sequence[int]],
        answer_starts: Sequence[int],
        model: PreTrainedModel | None = None,
        batch_size: int = 32,
        objective: str = "divergence",
        novices: Mapping[int, NoviceTable] | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown answer-loss objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        self.model = model if model is not None else builder.build()
        self.sparse = {index: layer.prefix for index, layer in builder.sparse_layers.items()}
        #: per layer, every expert's novice when pruned choices get them (candidates are scored with them)
        self.novices = dict(novices) if novices is not None else None
        self.masks: RouterMasks | NoviceMasks = (
            RouterMasks(self.model, builder.family, builder.config, self.sparse)
            if self.novices is None
            else NoviceMasks(self.model, self.sparse, _on_model(self.novices, self.model))
        )
        self.stream = LayerStream(self.model, token_ids, batch_size)
        #: Granite divides its logits by this (1 elsewhere)
        self.logits_scaling = float(getattr(self.model.config, "logits_scaling", 1.0) or 1.0)
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: (answer positions, their tokens)
        for batch in self.stream.batches:
            labels = torch.full_like(batch.ids, IGNORE)  # [B, S]: the token each position predicts
            for row, prompt in enumerate(batch.prompts):
                end = len(token_ids[prompt])
                start = min(max(1, answer_starts[prompt]), end)
                labels[row, start - 1 : end - 1] = batch.ids[row, start:end]
            where = labels != IGNORE
            self.targets.append((where, labels[where]))
        self.tokens = sum(int(where.sum()) for where, _ in self.targets)
        if self.tokens == 0:
            raise ValueError("no answer tokens to score: every calibration exchange needs a response")
        self.selection: dict[int, Kept] = {}
        self._inputs: dict[int, list[torch.Tensor]] = {0: [batch.hidden for batch in self.stream.batches]}
        self.evaluations = 0
        #: per batch: the full model's log-probabilities of its `TOP_TOKENS` likeliest tokens, and their ids
        self.reference = self._reference() if objective == "divergence" else None

    def _log_probs(self, finals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per batch, the next-token log-probabilities at the answer positions only: a large vocabulary times
        every position of every padded batch would not fit."""
        return [
            torch.log_softmax(self.model.lm_head(hidden[where]).float() / self.logits_scaling, dim=-1)
            for hidden, (where, _) in zip(finals, self.targets, strict=True)
        ]

    @torch.inference_mode()
    def _reference(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        finals = self.stream.run_from(0, self._inputs[0])
        tops = [lp.topk(min(TOP_TOKENS, lp.shape[-1]), dim=-1) for lp in self._log_probs(finals)]
        return [(top.values, top.indices) for top in tops]

    def _loss(self, finals: Sequence[torch.Tensor]) -> float:
        total = 0.0
        for index, log_probs in enumerate(self._log_probs(finals)):
            if self.reference is None:
                total -= float(log_probs.gather(1, self.targets[index][1][:, None]).sum())
            else:
                reference, ids = self.reference[index]
                total += float((reference.exp() * (reference - log_probs.gather(1, ids))).sum())
        return total / self.tokens

    @torch.inference_mode()
    def inputs(self, layer: int) -> list[torch.Tensor]:
        """The inputs of decoder layer `layer` under the current selection (cached)."""
        start = max(i for i in self._inputs if i <= layer)
        if start < layer:
            self.masks.apply(self.selection)
            with self.masks:
                hidden = self._inputs[start]
                for index in range(start, layer):
                    hidden = self.stream.forward(index, hidden)
                    self._inputs[index + 1] = hidden
        return self._inputs[layer]

    @torch.inference_mode()
    def evaluate(self, selection: Mapping[int, Kept], from_layer: int = 0) -> float:
        """The loss under `selection`, which must equal the current one in the layers before `from_layer`."""
        self.evaluations += 1
        inputs = self.inputs(from_layer)
        self.masks.apply(selection)
        with self.masks:
            return self._loss(self.stream.run_from(from_layer, inputs))

    def set(self, selection: Mapping[int, Kept], changed_from: int = 0) -> None:
        """Make `selection` current; it differs from the previous one only in layers >= `changed_from`."""
        self.selection = dict(selection)
        for layer in [i for i in self._inputs if i > changed_from]:
            del self._inputs[layer]

    @torch.inference_mode()
    def capture(self, layer: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MoE block's inputs and full routed outputs at `layer` under the current selection elsewhere
        (at most `max_tokens` of them, sampled)."""
        block = self.model.get_submodule(self.sparse[layer])
        inputs = self.inputs(layer)
        self.masks.apply({k: v for k, v in self.selection.items() if k != layer})
        with self.masks, BlockCapture(block, self.stream) as capture:
            self.stream.forward(layer, inputs)
        return capture.sample(max_tokens, seed=layer)


def refine_by_answer_loss(
    builder: VariantBuilder,
    token_ids: Sequence[Sequence[int]],
    answer_starts: Sequence[int],
    candidates: Mapping[str, Mapping[int, Sequence[int]]],
    tiebreak: Mapping[int, torch.Tensor],
    options: SearchOptions | None = None,
    progress: Progress | None = None,
    model: PreTrainedModel | None = None,
    move_budget: bool = False,
    novices: Mapping[int, NoviceTable] | None = None,
) -> AnswerLossSearch:
    """Choose among `candidates` (named selections) by the answer loss, then swap experts layer by layer while
    the loss drops. `answer_starts[i]` is where the answer of exchange i begins in its token ids; `tiebreak`
    scores order the swaps the layer-local error cannot; `progress(n)` counts forward passes; `model` is the
    full model when the caller has built it already. `move_budget` also moves kept-expert slots between
    layers while the loss drops (the total stays), then swaps again."""
    started = time.perf_counter()
    options = options or SearchOptions()
    loss = AnswerLoss(builder, token_ids, answer_starts, model, objective=options.e2e_objective)
    full_loss = loss.evaluate({})
    candidate_losses = {}
    for name, selection in candidates.items():
        candidate_losses[name] = loss.evaluate(_sorted(selection))
        if progress is not None:
            progress(loss.evaluations)
    start = min(candidate_losses, key=lambda name: (candidate_losses[name], name))
    search = _SwapSearch(builder, loss, tiebreak, options, progress, started)
    search.run(_sorted(candidates[start]), candidate_losses[start])
    while move_budget and search.move_slots():  # moves, then swaps among the moved counts, while either helps
        search.run(search.current, search.best)
    return AnswerLossSearch(
        start=start,
        kept=search.current,
        start_loss=candidate_losses[start],
        loss=search.best,
        full_loss=full_loss,
        swaps=search.swaps,
        candidate_losses=candidate_losses,
        evaluations=loss.evaluations,
        seconds=time.perf_counter() - started,
        stopped=search.stopped,
        moves=search.moves,
    )


def _on_model(tables: Mapping[int, NoviceTable], model: nn.Module) -> dict[int, NoviceTable]:
    """Novice tables on the model's device, in its dtype."""
    parameter = next(model.parameters())
    return {layer: table.to(parameter.device, parameter.dtype) for layer, table in tables.items()}


def _sorted(selection: Mapping[int, Sequence[int]]) -> dict[int, Kept]:
    return {layer: tuple(sorted(kept)) for layer, kept in selection.items()}


class _SwapSearch:
    """Best-of-a-few swaps, layer by layer and sweep by sweep, while the answer loss drops and the budget of
    forward passes (and the safety cap on seconds) lasts."""

    def __init__(
        self,
        builder: VariantBuilder,
        loss: AnswerLoss,
        tiebreak: Mapping[int, torch.Tensor],
        options: SearchOptions,
        progress: Progress | None,
        started: float,
    ) -> None:
        self.builder, self.loss, self.tiebreak, self.options = builder, loss, tiebreak, options
        self.progress, self.started = progress, started
        self.current: dict[int, Kept] = {}
        self.best = float("inf")
        self.swaps = 0
        self.moves = 0
        self._reconstructions: dict[int, BlockReconstruction] = {}  # for the current selection before each layer
        self.stopped = "converged"  # or "evaluations", "seconds": which budget ended the search

    def out_of_budget(self) -> bool:
        if self.loss.evaluations >= self.options.e2e_evaluations:
            self.stopped = "evaluations"
        elif time.perf_counter() - self.started > self.options.e2e_seconds:
            self.stopped = "seconds"
        return self.stopped != "converged"

    def run(self, start: dict[int, Kept], start_loss: float) -> None:
        if start != self.current:
            self._reconstructions = {}
        self.current, self.best = start, start_loss
        self.loss.set(start)
        for _ in range(self.options.e2e_sweeps):
            improved = False
            for layer in sorted(self.current):
                if self.out_of_budget():
                    break
                improved = self.refine_layer(layer) or improved
            if not improved or self.stopped != "converged":
                break

    def reconstruction(self, layer: int) -> BlockReconstruction:
        """The layer's block on tokens that reach it under the current selection (kept while the layers
        before it do not change)."""
        if layer not in self._reconstructions:
            experts = self.builder.sparse_layers[layer].num_experts
            hidden = int(self.builder.config.hidden_size)
            budget = token_budget(self.options, experts, hidden, self.loss.novices is not None)
            x, y = self.loss.capture(layer, budget)
            block = self.loss.model.get_submodule(self.loss.sparse[layer])
            novices = self.loss.novices[layer] if self.loss.novices is not None else None
            self._reconstructions[layer] = BlockReconstruction(
                block, self.builder.family, self.builder.config, layer, x, y, novices
            )
        return self._reconstructions[layer]

    def accept(self, selection: dict[int, Kept], value: float, changed_from: int, stale_ok: bool = False) -> None:
        """Make `selection` current. The later layers' reconstructions are rebuilt unless `stale_ok`: a move
        only ranks candidates with them, and rebuilding every later layer after each move (every expert's
        output on every sampled token) would cost more than the forward passes that judge the moves."""
        self.best, self.current = value, selection
        self.loss.set(selection, changed_from=changed_from)
        if not stale_ok:
            self._reconstructions = {k: v for k, v in self._reconstructions.items() if k <= changed_from}

    def _tried(self, selection: dict[int, Kept], from_layer: int) -> float:
        value = self.loss.evaluate(selection, from_layer=from_layer)
        if self.progress is not None:
            self.progress(self.loss.evaluations)
        return value

    def refine_layer(self, layer: int) -> bool:
        """Swaps in `layer`, each the best of the few the layer-local error ranks highest; True if any helped."""
        reconstruction = self.reconstruction(layer)
        improved = False
        for _ in range(self.options.max_swaps):
            if self.out_of_budget():
                break
            ranked = reconstruction.ranked_swaps(self.current[layer], self.tiebreak[layer], self.options.candidates)
            trials = [
                (self._tried({**self.current, layer: kept}, layer), kept)
                for _, kept in ranked[: self.options.e2e_pairs]
            ]
            if not trials:
                break
            value, kept = min(trials)
            if value >= self.best * (1 - 1e-4):
                break
            self.accept({**self.current, layer: kept}, value, layer)
            self.swaps += 1
            improved = True
        return improved

    def move_slots(self) -> int:
        """Move one kept expert's slot at a time from the layer where losing one costs least to the layer where
        gaining one helps most, while the answer loss drops: a task whose experts crowd into one layer gets
        more there and fewer where it needs few. The total, and each layer's top-k minimum, stay. Returns the
        moves made."""
        moves = 0
        while not self.out_of_budget() and self.move_slot():
            moves += 1
        if moves:  # the swaps that follow rank by reconstructions of the tokens as they now arrive
            self._reconstructions = {}
        self.moves += moves
        return moves

    def move_slot(self) -> bool:
        """One move: the best few additions and removals of each layer each get a forward pass, then the
        pairs (in two different layers) whose two changes alone helped most are tried together."""
        grown: dict[int, tuple[float, Kept]] = {}
        shrunk: dict[int, tuple[float, Kept]] = {}
        for layer in sorted(self.current):
            reconstruction = self.reconstruction(layer)
            for grow, found in ((True, grown), (False, shrunk)):
                ranked = reconstruction.ranked_resizes(
                    self.current[layer], self.tiebreak[layer], grow, self.options.move_pairs
                )
                trials = [(self._tried({**self.current, layer: kept}, layer), kept) for kept in ranked]
                if trials:
                    found[layer] = min(trials)
        pairs = sorted((grown[a][0] + shrunk[r][0], a, r) for a in grown for r in shrunk if a != r)[
            : self.options.move_trials
        ]
        for _, added, removed in pairs:
            if self.out_of_budget():
                break
            selection = {**self.current, added: grown[added][1], removed: shrunk[removed][1]}
            value = self._tried(selection, min(added, removed))
            if value < self.best * (1 - 1e-4):
                self.accept(selection, value, min(added, removed), stale_ok=True)
                return True
        return False
