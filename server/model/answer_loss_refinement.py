"""End-to-end refinement of an expert selection by the calibration exchanges' answer loss.

When the model fits in memory, the loss that matters can be measured directly: the cross-entropy of the
answer tokens of the task's calibration exchanges, with the routers restricted to a candidate selection
(`masking.RouterMasks`: exactly the variant's computation, nothing built or read). The search chooses among
candidate selections (every score's, and the layer-local refinement's), then swaps a kept expert for a
pruned one, layer by layer, while that loss drops. The layer-local reconstruction error ranks which swaps
get a forward pass, and the inputs of every layer are cached for the current selection, so a swap in layer
l reruns layers l.. only. The search is bounded by a number of forward passes (reproducible on any machine).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from server.model.layer_stream import LayerStream, Progress
from server.model.local_refinement import BlockCapture, BlockReconstruction, Kept, SearchOptions, token_budget
from server.model.masking import RouterMasks
from server.model.variant import VariantBuilder

IGNORE = -100


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


class AnswerLoss:
    """Mean cross-entropy of the answer tokens of calibration exchanges under masked routing, with the inputs
    of every layer cached for the current selection."""

    def __init__(
        self,
        builder: VariantBuilder,
        token_ids: Sequence[Sequence[int]],
        answer_starts: Sequence[int],
        model: PreTrainedModel | None = None,
        batch_size: int = 32,
    ) -> None:
        self.model = model if model is not None else builder.build()
        self.sparse = {index: layer.prefix for index, layer in builder.sparse_layers.items()}
        self.masks = RouterMasks(self.model, builder.family, builder.config, self.sparse)
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

    def _loss(self, finals: Sequence[torch.Tensor]) -> float:
        """Only the answer positions go through the LM head: a large vocabulary times every position of
        every padded batch would not fit."""
        total = 0.0
        for hidden, (where, tokens) in zip(finals, self.targets, strict=True):
            logits = self.model.lm_head(hidden[where]).float() / self.logits_scaling  # [answer tokens, vocabulary]
            total += float(torch.nn.functional.cross_entropy(logits, tokens, reduction="sum"))
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
) -> AnswerLossSearch:
    """Choose among `candidates` (named selections) by the answer loss, then swap experts layer by layer while
    the loss drops. `answer_starts[i]` is where the answer of exchange i begins in its token ids; `tiebreak`
    scores order the swaps the layer-local error cannot; `progress(n)` counts forward passes; `model` is the
    full model when the caller has built it already."""
    started = time.perf_counter()
    loss = AnswerLoss(builder, token_ids, answer_starts, model)
    full_loss = loss.evaluate({})
    candidate_losses = {}
    for name, selection in candidates.items():
        candidate_losses[name] = loss.evaluate(_sorted(selection))
        if progress is not None:
            progress(loss.evaluations)
    start = min(candidate_losses, key=lambda name: (candidate_losses[name], name))
    search = _SwapSearch(builder, loss, tiebreak, options or SearchOptions(), progress, started)
    search.run(_sorted(candidates[start]), candidate_losses[start])
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
    )


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
        self.stopped = "converged"  # or "evaluations", "seconds": which budget ended the search

    def out_of_budget(self) -> bool:
        if self.loss.evaluations >= self.options.e2e_evaluations:
            self.stopped = "evaluations"
        elif time.perf_counter() - self.started > self.options.e2e_seconds:
            self.stopped = "seconds"
        return self.stopped != "converged"

    def run(self, start: dict[int, Kept], start_loss: float) -> None:
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

    def refine_layer(self, layer: int) -> bool:
        """Swaps in `layer`, each the best of the few the layer-local error ranks highest; True if any helped."""
        experts = self.builder.sparse_layers[layer].num_experts
        budget = token_budget(self.options, experts, int(self.builder.config.hidden_size))
        x, y = self.loss.capture(layer, budget)
        block = self.loss.model.get_submodule(self.loss.sparse[layer])
        reconstruction = BlockReconstruction(block, self.builder.family, self.builder.config, layer, x, y)
        improved = False
        for _ in range(self.options.max_swaps):
            if self.out_of_budget():
                break
            ranked = reconstruction.ranked_swaps(self.current[layer], self.tiebreak[layer], self.options.candidates)
            trials = []
            for _, kept in ranked[: self.options.e2e_pairs]:
                trials.append((self.loss.evaluate({**self.current, layer: kept}, from_layer=layer), kept))
                if self.progress is not None:
                    self.progress(self.loss.evaluations)
            if not trials:
                break
            value, kept = min(trials)
            if value >= self.best * (1 - 1e-4):
                break
            self.best, self.current = value, {**self.current, layer: kept}
            self.loss.set(self.current, changed_from=layer)
            self.swaps += 1
            improved = True
        return improved
