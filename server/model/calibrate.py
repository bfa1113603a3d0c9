"""Calibration: run a task's prompts through the full model and collect what the scores need.

The model runs one decoder layer at a time, as the PreMoe reference implementation does: the batch's
hidden states are carried from layer to layer, and each layer's weights are read from the mmap'd
checkpoint, used and released. Peak memory is one layer plus the hidden states, so a model larger
than memory can be calibrated. Forward hooks collect, per layer, the router's logits, gating weights
and selections (MoE, for TCESS) or the statistics of the activation entering `down_proj` (dense, SEAP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from pattern_store.seap import ChannelStatistics
from pattern_store.tcess import RouterStatistics
from server.model.variant import VariantBuilder

Progress = Callable[[int], None]


@dataclass
class CalibrationStatistics:
    """Per-layer router statistics (MoE) or channel statistics (dense) over a set of prompts."""

    kind: str  # "moe_experts" or "dense_channels"
    prompts: int
    tokens: int
    router: dict[int, RouterStatistics] = field(default_factory=dict)
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


def _batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches (input ids, mask of real tokens), longest first to waste little padding."""
    ordered = sorted(token_ids, key=len, reverse=True)
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        batches.append((ids, mask))
    return batches


def _gating(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1) if activation == "softmax" else torch.sigmoid(logits.float())


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
    if not token_ids or not all(token_ids):
        raise ValueError("calibration needs at least one non-empty prompt")
    config = builder.config
    moe = builder.family.kind == "moe"
    stats = CalibrationStatistics(
        kind="moe_experts" if moe else "dense_channels",
        prompts=len(token_ids),
        tokens=sum(len(t) for t in token_ids),
    )
    model = builder.skeleton()
    inner = model.model
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    batches = _batches(token_ids, batch_size, pad_id)

    builder.materialise(model, "model.embed_tokens")
    builder.materialise(model, "model.rotary_emb")
    states = []
    for ids, mask in batches:
        hidden = inner.embed_tokens(ids.to(builder.device))
        positions = torch.arange(ids.shape[1], device=builder.device)[None]
        masks = {
            "full_attention": create_causal_mask(config, hidden, mask.to(builder.device), None, positions),
            "sliding_attention": create_sliding_window_causal_mask(
                config, hidden, mask.to(builder.device), None, positions
            )
            if getattr(config, "sliding_window", None)
            else None,
        }
        states.append([hidden, positions, inner.rotary_emb(hidden, positions), masks, mask.reshape(-1).bool()])
    builder.release(model, "model.embed_tokens")

    layer_types = getattr(config, "layer_types", None)
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}"
        builder.materialise(model, prefix)
        layer = inner.layers[index]
        real: list[torch.Tensor] = []
        handles = []
        if index in builder.sparse_layers:
            router_stats = stats.router[index] = RouterStatistics(builder.sparse_layers[index].num_experts, threshold)

            def on_router(module, args, output, router_stats=router_stats, real=real):
                logits, _, selected = output
                keep = real[0].to(logits.device)
                logits = logits.reshape(-1, logits.shape[-1])[keep]
                selected = selected.reshape(-1, selected.shape[-1])[keep]
                router_stats.update(logits, _gating(logits, builder.family.router_activation), selected)

            handles.append(layer.mlp.gate.register_forward_hook(on_router))
        elif index in builder.dense_layers and not moe:
            channel_stats = stats.channels[index] = ChannelStatistics(builder.dense_layers[index].intermediate)

            def on_down(module, args, channel_stats=channel_stats, real=real):
                activation = args[0].reshape(-1, args[0].shape[-1])
                channel_stats.update(activation[real[0].to(activation.device)])

            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down))
        kind = layer_types[index] if layer_types else "full_attention"
        for state in states:
            hidden, positions, rotary, masks, keep = state
            real[:] = [keep]
            attention_mask = masks.get(kind)
            state[0] = layer(
                hidden,
                attention_mask=masks["full_attention"] if attention_mask is None else attention_mask,
                position_ids=positions,
                position_embeddings=rotary,
            )
        for handle in handles:
            handle.remove()
        builder.release(model, prefix)
        if after_layer is not None:
            after_layer(index)
        if progress is not None:
            progress(index + 1)
    return stats
