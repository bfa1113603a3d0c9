"""What a model's module tree holds, known from its config alone, and what a selection of it may keep.

The layout names the sparse (MoE) layers with their expert counts, the dense MLPs with their widths, the tied
and the computed tensors. Every selection is checked against it before anything is sized, read or built:
layers that exist, experts or channels that exist, at least the top-k routing, the family's routing rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from pattern_store.selection import Selection, SelectionError
from server.model.checkpoint import CheckpointError
from server.model.families import Family
from server.model.module_tree import meta_model

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class SparseLayer:
    """Where a sparse (MoE) layer's experts and router live in the module tree."""

    index: int
    prefix: str  # e.g. "model.layers.3.mlp"
    num_experts: int
    intermediate: int
    #: one expert's shape of each per-expert tensor of the experts module (its [E, ...] tensors without E)
    expert_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def expert_elements(self) -> int:
        """Elements of one expert: its projections and any biases."""
        return sum(math.prod(shape) for shape in self.expert_shapes.values())


@dataclass(frozen=True)
class DenseLayer:
    """A dense MLP whose channels can be pruned."""

    index: int
    prefix: str
    intermediate: int


@dataclass(frozen=True)
class LayerExperts:
    """One sparse layer of a checked selection: its kept experts (sorted) and the router overrides that its
    routing rule needs (DeepSeek-V3's expert groups)."""

    kept: tuple[int, ...]
    overrides: dict[str, Any]


def sparse_layers(model: nn.Module, family: Family) -> list[SparseLayer]:
    """The MoE blocks of a model: modules with a fused `experts` module and the family's router."""
    found = []
    for prefix, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(module, family.router):
            match = _LAYER.search(f".{prefix}.")
            if match is None:
                raise CheckpointError(f"cannot tell the layer number of MoE block {prefix}")
            shapes = {name: tuple(int(n) for n in getattr(experts, name).shape) for name in family.expert_tensors}
            down = shapes["down_proj"]  # [E, H, I], or [E, I, H] transposed
            intermediate = down[1] if family.experts_layout == "transposed" else down[2]
            per_expert = {name: shape[1:] for name, shape in shapes.items()}
            found.append(SparseLayer(int(match.group(1)), prefix, down[0], intermediate, per_expert))
    return found


def dense_layers(model: nn.Module) -> list[DenseLayer]:
    """The gated MLPs of a dense model (`gate_proj`, `up_proj`, `down_proj` linear layers)."""
    found = []
    for prefix, module in model.named_modules():
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            match = _LAYER.search(f".{prefix}.")
            if match is not None:
                found.append(DenseLayer(int(match.group(1)), prefix, module.gate_proj.out_features))
    return found


class ModelLayout:
    """The layers of one model config, and the checks of a selection against them."""

    def __init__(self, config: PretrainedConfig, family: Family) -> None:
        self.config = config
        self.family = family
        template = meta_model(config)
        self.sparse_layers = {layer.index: layer for layer in sparse_layers(template, family)}
        self.dense_layers = {layer.index: layer for layer in dense_layers(template)}
        #: tensors tied to another (the LM head to the embeddings): read only when the checkpoint holds them
        self.tied = set(getattr(template, "all_tied_weights_keys", {}) or {})
        #: bytes of the buffers every model computes at load (rotary frequencies): each model owns its own
        self.computed_bytes = sum(
            buffer.numel() * buffer.element_size() for _, buffer in template.named_non_persistent_buffers()
        )

    @property
    def is_moe(self) -> bool:
        return self.family.kind == "moe"

    def checked(self, selection: Selection | None) -> Selection:
        """`selection`, or the full model's (nothing pruned) when None, once its kind fits the model."""
        expected = "moe_experts" if self.is_moe else "dense_channels"
        if selection is None:
            return Selection(kind=expected, layers={})
        if selection.kind != expected:
            raise SelectionError(f"a {self.family.name} model takes {expected} selections, not {selection.kind}")
        return selection

    def moe_plan(self, selection: Selection) -> dict[int, LayerExperts]:
        """Per sparse layer: the kept experts (every expert where the selection does not name the layer) and the
        router overrides the routing rule needs."""
        unknown = sorted(set(selection.layers) - set(self.sparse_layers))
        if unknown:
            raise SelectionError(
                f"the selection names layers {unknown} that have no routed experts; sparse layers are "
                f"{sorted(self.sparse_layers)}"
            )
        top_k = int(self.config.num_experts_per_tok)
        hidden = int(self.config.hidden_size)
        plan = {}
        for index, novices in selection.novices.items():
            pruned = self.sparse_layers[index].num_experts - len(selection.layers[index])
            if tuple(novices.shape) != (pruned, hidden):
                raise SelectionError(
                    f"layer {index}: novices of shape {list(novices.shape)}, but it prunes {pruned} experts of "
                    f"hidden size {hidden}"
                )
        for index, layer in self.sparse_layers.items():
            kept = selection.kept(index) or tuple(range(layer.num_experts))
            if kept[-1] >= layer.num_experts:
                raise SelectionError(f"layer {index}: expert {kept[-1]} does not exist ({layer.num_experts} experts)")
            if len(kept) < top_k:
                raise SelectionError(f"layer {index}: keeps {len(kept)} experts, fewer than the top-{top_k} routing")
            pruned = len(kept) < layer.num_experts
            # with novices the router keeps every expert and its own rule: no override, no group constraint
            restricted = pruned and index not in selection.novices
            overrides = self.family.routing_overrides(self.config, index, kept) if restricted else {}
            plan[index] = LayerExperts(kept, overrides)
        return plan

    def kept_experts(self, selection: Selection | None) -> dict[int, tuple[int, ...]]:
        """Per sparse layer that a MoE selection prunes, its kept experts (sorted), checked against the model
        and its routing rule; None (the full model) prunes nothing."""
        if selection is None:
            return {}
        return {
            index: layer.kept
            for index, layer in self.moe_plan(self.checked(selection)).items()
            if len(layer.kept) < self.sparse_layers[index].num_experts
        }

    def dense_plan(self, selection: Selection) -> dict[int, tuple[int, ...]]:
        """Per MLP layer the selection prunes, its kept channels; the bias compensation checked too."""
        unknown = sorted(set(selection.layers) - set(self.dense_layers))
        if unknown:
            raise SelectionError(
                f"the selection names layers {unknown}; the model's MLP layers are {sorted(self.dense_layers)}"
            )
        for index, kept in selection.layers.items():
            size = self.dense_layers[index].intermediate
            if kept[-1] >= size:
                raise SelectionError(f"layer {index}: channel {kept[-1]} does not exist (width {size})")
        for index, bias in selection.bias.items():
            if index not in self.dense_layers:
                raise SelectionError(f"bias for layer {index}, which has no MLP")
            if len(bias) != self.config.hidden_size:
                raise SelectionError(
                    f"layer {index}: bias has {len(bias)} values, the hidden size is {self.config.hidden_size}"
                )
        return dict(selection.layers)
