"""Calibration: run a task's prompts through the full model and collect what the scores need.

The model runs one decoder layer at a time, as the PreMoe reference implementation does: the batch's
hidden states are carried from layer to layer (`LayerStream`), and each layer's weights are read from the
mmap'd checkpoint, used and released. Peak memory is one layer plus the hidden states, so a model larger
than memory can be calibrated. Forward hooks collect, per layer:

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
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from pattern_store.expert_scores import ExpertStatistics
from pattern_store.seap import ChannelStatistics
from server.model.variant import VariantBuilder

Progress = Callable[[int], None]


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


@dataclass
class StreamBatch:
    """One right-padded batch of prompts as it travels through the decoder layers."""

    hidden: torch.Tensor  # [B, S, H], the input of the next layer
    positions: torch.Tensor  # [1, S]
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [1, S, head_dim]
    masks: dict[str, torch.Tensor | None]  # attention mask per layer type
    real: torch.Tensor  # [B * S] bool: real tokens, not padding
    ids: torch.Tensor  # [B, S] token ids
    prompts: list[int]  # the index of each row's prompt in the stream's input


def padded_batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Right-padded batches (input ids [B, S], mask of real tokens [B, S], the prompts' indices), longest
    first to waste little padding."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(token_ids[chunk[0]])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            sequence = token_ids[prompt]
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        batches.append((ids, mask, chunk))
    return batches


class LayerStream:
    """Calibration tokens carried through a model's decoder layers, one layer at a time.

    `model` may be a skeleton whose layers are materialised one by one (calibration) or a whole model
    (refinement by answer loss). Observers read `current` to know which batch (and which of its tokens are
    real) the layer is processing.
    """

    def __init__(self, model: PreTrainedModel, token_ids: Sequence[Sequence[int]], batch_size: int = 16) -> None:
        if not token_ids or not all(token_ids):
            raise ValueError("calibration needs at least one non-empty prompt")
        self.model = model
        self.config = model.config
        inner = model.model
        device = inner.embed_tokens.weight.device
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.batches: list[StreamBatch] = []
        layer_types = getattr(self.config, "layer_types", None)
        self.layer_types = list(layer_types) if layer_types else ["full_attention"] * self.config.num_hidden_layers
        with torch.inference_mode():
            for ids, mask, prompts in padded_batches(token_ids, batch_size, pad_id):
                ids, mask = ids.to(device), mask.to(device)
                hidden = inner.embed_tokens(ids)
                positions = torch.arange(ids.shape[1], device=device)[None]
                sliding = getattr(self.config, "sliding_window", None)
                masks = {
                    "full_attention": create_causal_mask(self.config, hidden, mask, None, positions),
                    "sliding_attention": create_sliding_window_causal_mask(self.config, hidden, mask, None, positions)
                    if sliding
                    else None,
                }
                rotary = inner.rotary_emb(hidden, positions)
                self.batches.append(
                    StreamBatch(hidden, positions, rotary, masks, mask.reshape(-1).bool(), ids, prompts)
                )
        self.current: StreamBatch = self.batches[0]

    @property
    def tokens(self) -> int:
        return int(sum(int(batch.real.sum()) for batch in self.batches))

    def layer_kwargs(self, index: int, batch: StreamBatch) -> dict[str, Any]:
        mask = batch.masks.get(self.layer_types[index])
        return {
            "attention_mask": batch.masks["full_attention"] if mask is None else mask,
            "position_ids": batch.positions,
            "position_embeddings": batch.rotary,
        }

    @torch.inference_mode()
    def run_layer(self, index: int, inputs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run decoder layer `index` over every batch (its inputs: the stream's, or `inputs`), return the
        outputs and make them the stream's."""
        layer = self.model.model.layers[index]
        outputs = []
        for position, batch in enumerate(self.batches):
            self.current = batch
            hidden = batch.hidden if inputs is None else inputs[position]
            outputs.append(layer(hidden, **self.layer_kwargs(index, batch)))
        for batch, output in zip(self.batches, outputs, strict=True):
            batch.hidden = output
        return outputs

    @torch.inference_mode()
    def run_from(self, index: int, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The final hidden states (after the model's last norm) when `inputs` enter layer `index`; the stream
        itself is left as it was."""
        outputs = list(inputs)
        for layer_index in range(index, self.config.num_hidden_layers):
            layer = self.model.model.layers[layer_index]
            for position, batch in enumerate(self.batches):
                self.current = batch
                outputs[position] = layer(outputs[position], **self.layer_kwargs(layer_index, batch))
        return [self.model.model.norm(hidden) for hidden in outputs]


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
    layer norm received, so that h_out = h_in + routed output (EASY-EP's token weight).
    """

    def __init__(
        self, layer: nn.Module, block: nn.Module, stats: ExpertStatistics, stream: LayerStream, activation: str
    ) -> None:
        self.stats = stats
        self.stream = stream
        self.activation = activation
        self.experts = block.experts
        self.residual: torch.Tensor | None = None
        norm = getattr(layer, "post_attention_layernorm", None)
        if norm is None:
            raise ValueError(f"{type(layer).__name__} has no post_attention_layernorm: cannot read its residual")
        self.handles = [
            block.gate.register_forward_hook(self.on_router),
            norm.register_forward_pre_hook(self.on_residual),
            block.experts.register_forward_hook(self.on_experts),
        ]

    def on_router(self, module: nn.Module, args: Any, output: Any) -> None:
        logits, _, selected = output
        real = self.stream.current.real.to(logits.device)
        logits = logits.reshape(-1, logits.shape[-1])[real]
        self.stats.update(logits, _gating(logits, self.activation), selected.reshape(-1, selected.shape[-1])[real])

    def on_residual(self, module: nn.Module, args: Any) -> None:
        self.residual = args[0]

    def on_experts(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        hidden, top_index, top_weights = args[0], args[1], args[2]
        real = self.stream.current.real.to(hidden.device)
        hidden, top_index, top_weights, routed = hidden[real], top_index[real], top_weights[real], output[real]
        k = top_index.shape[-1]
        outputs = expert_outputs(self.experts, hidden.repeat_interleave(k, dim=0), top_index.reshape(-1))
        norms = outputs.float().norm(dim=-1).view(-1, k)  # [T, k]
        if self.residual is None:
            raise RuntimeError("the MoE block ran before its layer norm: cannot read the residual stream")
        residual = self.residual.reshape(-1, self.residual.shape[-1])[real].float()
        change = 1.0 - torch.nn.functional.cosine_similarity(residual, residual + routed.float(), dim=-1)
        self.stats.update_outputs(top_weights, top_index, norms, change)

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


def streamed_model(builder: VariantBuilder, token_ids: Sequence[Sequence[int]], batch_size: int) -> LayerStream:
    """A skeleton of the model with only its embeddings read, and the prompts embedded."""
    model = builder.skeleton()
    builder.materialise(model, "model.embed_tokens")
    builder.materialise(model, "model.rotary_emb")
    stream = LayerStream(model, token_ids, batch_size)
    builder.release(model, "model.embed_tokens")
    return stream


@torch.inference_mode()
def collect_statistics(
    builder: VariantBuilder,
    token_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
    threshold: float = 0.0,
    progress: Progress | None = None,
    after_layer: Callable[[int], None] | None = None,
) -> CalibrationStatistics:
    """Statistics of `token_ids` (one list of ids per prompt), layer by layer.

    `progress(n)` is called with the number of layers done so far; `after_layer(l)` right after layer
    l's weights are released (tests use it to watch memory).
    """
    stream = streamed_model(builder, token_ids, batch_size)
    moe = builder.family.kind == "moe"
    stats = CalibrationStatistics(
        kind="moe_experts" if moe else "dense_channels", prompts=len(token_ids), tokens=stream.tokens
    )
    model = stream.model
    for index in range(builder.config.num_hidden_layers):
        prefix = f"model.layers.{index}"
        builder.materialise(model, prefix)
        layer = model.model.layers[index]
        observer: MoeObserver | DenseObserver | None = None
        if index in builder.sparse_layers:
            sparse = builder.sparse_layers[index]
            stats.router[index] = ExpertStatistics(sparse.num_experts, threshold)
            block = model.get_submodule(sparse.prefix)
            observer = MoeObserver(layer, block, stats.router[index], stream, builder.family.router_activation)
        elif index in builder.dense_layers and not moe:
            dense = builder.dense_layers[index]
            stats.channels[index] = ChannelStatistics(dense.intermediate)
            observer = DenseObserver(model.get_submodule(dense.prefix), stats.channels[index], stream)
        try:
            stream.run_layer(index)
        finally:
            if observer is not None:
                observer.close()
        builder.release(model, prefix)
        if after_layer is not None:
            after_layer(index)
        if progress is not None:
            progress(index + 1)
    return stats
