"""Calibration: run a task's prompts through the full model and collect what the scores need.

The model runs one decoder layer at a time (`layer_stream.StreamedLayers`): each layer's weights are read from
the mmap'd checkpoint, used and freed, so a model larger than memory can be calibrated. Forward hooks
collect, per layer:

- MoE (`MoeObserver`): the router's logits, gating weights and selections (TCESS and its baselines), and
  the routed experts' outputs: each selected expert's output norm, its gate weight and how much the routed
  experts turn the residual stream (REAP, EAN, EASY-EP);
- dense (`DenseObserver`): the statistics of the activation entering `down_proj` (SEAP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pattern_store.expert_scores import ExpertStatistics
from pattern_store.seap import ChannelStatistics
from pattern_store.substitutes import ExpertSamples, samples_per_expert
from server.model.families import Family
from server.model.layer_stream import LayerStream, Progress, StreamedLayers
from server.model.masking import router_of
from server.model.variant import VariantBuilder


@dataclass
class CalibrationStatistics:
    """Per-layer expert statistics (MoE) or channel statistics (dense) over a set of prompts."""

    kind: str  # "moe_experts" or "dense_channels"
    prompts: int
    tokens: int
    router: dict[int, ExpertStatistics] = field(default_factory=dict)
    channels: dict[int, ChannelStatistics] = field(default_factory=dict)

    def merge(self, other: CalibrationStatistics) -> CalibrationStatistics:
        """Both prompt sets together: the task-agnostic baseline and SEAP's general mask pool all tasks."""
        return CalibrationStatistics(
            kind=self.kind,
            prompts=self.prompts + other.prompts,
            tokens=self.tokens + other.tokens,
            router={layer: stats.merge(other.router[layer]) for layer, stats in self.router.items()},
            channels={layer: stats.merge(other.channels[layer]) for layer, stats in self.channels.items()},
        )


def _gating(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1) if activation == "softmax" else torch.sigmoid(logits.float())


def expert_outputs(experts: nn.Module, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """E_j(x) for each pair (rows[i], expert_ids[i]), by the experts module's own code (weight 1, one expert
    per row): [P, H] for rows [P, H] and expert ids [P]."""
    ids = expert_ids.reshape(-1, 1)
    ones = torch.ones(ids.shape, dtype=rows.dtype, device=rows.device)
    return experts.forward(rows, ids, ones)


class MoeObserver:
    """Hooks on one MoE layer that feed its `ExpertStatistics` batch by batch.

    The router hook sees logits and selections (routing scores). The experts hook sees the routed tokens,
    their selections and gate weights, and the routed output: it recomputes each selected expert's output
    (the experts module's own code) for its norm, and reads the residual stream h_in that the router's
    layer norm received, so that h_out = h_in + routed output (EASY-EP's token weight); in a post-norm layer
    (MiniMax) h_in is the norm's output times `mlp_alpha_factor` and the routed output is scaled by
    `mlp_beta_factor`.
    """

    def __init__(
        self, layer: nn.Module, block: nn.Module, stats: ExpertStatistics, stream: LayerStream, family: Family
    ) -> None:
        self.stats = stats
        self.stream = stream
        self.activation = family.router_activation
        self.experts = block.experts
        self.residual: torch.Tensor | None = None
        #: Granite scales what each sublayer adds to the residual stream
        self.residual_multiplier = float(getattr(layer, "residual_multiplier", 1.0))
        #: MiniMax's layers are post-norm: the stream the MoE block adds to is the norm's output, scaled by
        #: `mlp_alpha_factor`, and the block's output is scaled by `mlp_beta_factor`
        self.post_norm = hasattr(layer, "mlp_alpha_factor")
        self.stream_scale = float(getattr(layer, "mlp_alpha_factor", 1.0))
        if self.post_norm:
            self.residual_multiplier = float(layer.mlp_beta_factor)
        norm = getattr(layer, "post_attention_layernorm", None)
        if norm is None:
            raise ValueError(f"{type(layer).__name__} has no post_attention_layernorm: cannot read its residual")
        residual_hook = (
            norm.register_forward_hook(self.on_normed)
            if self.post_norm
            else norm.register_forward_pre_hook(self.on_residual)
        )
        self.handles = [
            router_of(block, family).register_forward_hook(self.on_router),
            residual_hook,
            block.experts.register_forward_hook(self.on_experts),
        ]

    def on_router(self, module: nn.Module, args: Any, output: Any) -> None:
        logits, weights, selected = output
        real = self.stream.current.real.to(logits.device)
        logits = logits.reshape(-1, logits.shape[-1])[real]
        selected = selected.reshape(-1, selected.shape[-1])[real]
        self.stats.update(logits, _gating(logits, self.activation), selected)
        answer = self.stream.current.answer
        answer = answer.to(logits.device)[real] if answer is not None else None
        self.stats.update_weights(weights.reshape(-1, weights.shape[-1])[real], selected, answer)

    def on_residual(self, module: nn.Module, args: Any) -> None:
        self.residual = args[0]

    def on_normed(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.residual = output

    def on_experts(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        hidden, top_index, top_weights = args[0], args[1], args[2]
        real = self.stream.current.real.to(hidden.device)
        hidden, top_index, top_weights, routed = hidden[real], top_index[real], top_weights[real], output[real]
        k = top_index.shape[-1]
        rows = hidden.repeat_interleave(k, dim=0)
        outputs = expert_outputs(self.experts, rows, top_index.reshape(-1))
        norms = outputs.float().norm(dim=-1).view(-1, k)  # [T, k]
        if self.residual is None:
            raise RuntimeError("the MoE block ran before its layer norm: cannot read the residual stream")
        residual = self.stream_scale * self.residual.reshape(-1, self.residual.shape[-1])[real].float()
        added = self.residual_multiplier * routed.float()
        change = 1.0 - torch.nn.functional.cosine_similarity(residual, residual + added, dim=-1)
        self.stats.update_outputs(top_weights, top_index, norms, change, outputs, rows)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class DenseObserver:
    """A hook on one dense MLP's `down_proj` that feeds its `ChannelStatistics`."""

    def __init__(self, mlp: nn.Module, stats: ChannelStatistics, stream: LayerStream) -> None:
        self.stats = stats
        self.stream = stream
        self.handle = mlp.down_proj.register_forward_pre_hook(self.on_down)

    def on_down(self, module: nn.Module, args: Any) -> None:
        activation = args[0].reshape(-1, args[0].shape[-1])
        self.stats.update(activation[self.stream.current.real.to(activation.device)])

    def close(self) -> None:
        self.handle.remove()


def _observe(
    builder: VariantBuilder,
    streamed: StreamedLayers,
    index: int,
    stats: CalibrationStatistics,
    threshold: float,
    sampled: bool = False,
) -> MoeObserver | DenseObserver | None:
    """Hooks that feed layer `index`'s statistics while it runs (None for a dense layer of a MoE model);
    `sampled`: keep a sample of each expert's tokens for its low-rank novice."""
    model = streamed.model
    if index in builder.sparse_layers:
        sparse = builder.sparse_layers[index]
        stats.router[index] = ExpertStatistics(sparse.num_experts, threshold)
        if sampled:
            capacity = samples_per_expert(sparse.num_experts, int(builder.config.hidden_size))
            stats.router[index].samples = ExpertSamples(sparse.num_experts, capacity, seed=index)
        block = model.get_submodule(sparse.prefix)
        layer = model.model.layers[index]
        return MoeObserver(layer, block, stats.router[index], streamed.stream, builder.family)
    if index in builder.dense_layers and builder.family.kind != "moe":
        dense = builder.dense_layers[index]
        stats.channels[index] = ChannelStatistics(dense.intermediate)
        return DenseObserver(model.get_submodule(dense.prefix), stats.channels[index], streamed.stream)
    return None


@torch.inference_mode()
def collect_statistics(
    builder: VariantBuilder,
    token_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
    threshold: float = 0.0,
    progress: Progress | None = None,
    after_layer: Callable[[int], None] | None = None,
    answer_starts: Sequence[int] | None = None,
    low_rank: int | None = None,
) -> CalibrationStatistics:
    """Statistics of `token_ids` (one list of ids per prompt), layer by layer. `low_rank`: also fit every
    expert's low-rank novice of that rank (on a sample of its tokens, when its layer is done).

    `progress(n)` is called with the number of layers done so far; `after_layer(l)` right after layer
    l's weights are freed (tests use it to watch memory). `answer_starts`: where each prompt's answer
    begins (its length when it has none), for the coverage of the answers' tokens.
    """
    streamed = StreamedLayers(builder.layout, builder.tensors, token_ids, batch_size, answer_starts)
    kind = "moe_experts" if builder.family.kind == "moe" else "dense_channels"
    stats = CalibrationStatistics(kind=kind, prompts=len(token_ids), tokens=streamed.stream.tokens)
    for index in streamed.layers(progress, after_layer):
        observer = _observe(builder, streamed, index, stats, threshold, sampled=low_rank is not None)
        try:
            streamed.stream.run_layer(index)
        finally:
            if observer is not None:
                observer.close()
        if low_rank is not None and index in stats.router:
            stats.router[index].fit_low_rank(low_rank)
    return stats
