"""Building a pruned variant straight from the checkpoint on disk, without ever holding the full model.

The model is constructed on the meta device (no memory), then every parameter is assigned a real tensor:
backbone tensors (embeddings, attention, norms, shared experts, dense MLPs, the LM head) are read once
per builder and shared by every variant it builds; routed experts and router rows are read for the kept
experts only, MLP channels for the kept channels only.

`VariantBuilder` is the one object the server holds per model. It composes the parts that do the work:
`CheckpointReader` (the files, every byte counted), `ModelLayout` (the layers, and the checks of a selection),
`TensorReader` and `Backbone` (tensors by module name on the target device and dtype), `VariantSizes` (bytes,
before building). The expert pool builds on it in `pooled`, calibration streams layers in `layer_stream`.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from pattern_store.selection import Selection
from server.model.checkpoint import CheckpointReader, read_generation_config
from server.model.families import Family, family_for
from server.model.layout import DenseLayer, LayerExperts, ModelLayout, SparseLayer
from server.model.masking import configure_router, router_of
from server.model.module_tree import compute_buffers, computed_buffer_names, meta_model, set_tensor
from server.model.novices import NoviceExperts, NoviceTable, novice_tables
from server.model.sizing import VariantSizes
from server.model.tensor_reader import Backbone, TensorReader


def resolve_dtype(name: str | torch.dtype | None, config: PretrainedConfig) -> torch.dtype:
    """'auto' (or None) is the checkpoint's own dtype; otherwise a torch dtype or its name."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, torch.dtype):
            return stored
        return getattr(torch, stored) if isinstance(stored, str) else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dtype


def _stored_dtype(config: PretrainedConfig) -> Any:
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' (or None) is the first GPU when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return device


class VariantBuilder:
    """Sizes and builds the variants of one checkpoint on one device in one dtype; they share the backbone."""

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = "cpu", dtype: Any = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.reader = CheckpointReader(self.model_dir)
        # a multimodal release (Qwen3.5) is served as its text model, the one AutoModelForCausalLM builds; its
        # dtype is the release's (the text config of a saved multimodal config leaves it out)
        release = AutoConfig.from_pretrained(self.model_dir)
        self.config = release.get_text_config()
        self.family: Family = family_for(self.config.model_type)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.config if _stored_dtype(self.config) else release)
        self.layout = ModelLayout(self.config, self.family)
        self.tensors = TensorReader(self.reader, self.family, self.device, self.dtype, int(self.config.hidden_size))
        self.backbone = Backbone(self.tensors)
        self.sizes = VariantSizes(self.layout, self.tensors)
        self.generation_config = read_generation_config(self.model_dir)
        self._derived: dict[str, torch.Tensor] = {}  # buffers computed in place of missing ones, shared
        self._derived_lock = threading.Lock()

    @property
    def sparse_layers(self) -> dict[int, SparseLayer]:
        return self.layout.sparse_layers

    @property
    def dense_layers(self) -> dict[int, DenseLayer]:
        return self.layout.dense_layers

    def kept_experts(self, selection: Selection | None) -> dict[int, tuple[int, ...]]:
        """Per sparse layer that a MoE selection prunes, its kept experts, checked (see `ModelLayout`)."""
        return self.layout.kept_experts(selection)

    def novice_tables(self, selection: Selection | None) -> dict[int, NoviceTable]:
        """Per layer whose pruned experts have novices, its table on this builder's device and in its dtype."""
        if selection is None or not selection.novices:
            return {}
        counts = {index: layer.num_experts for index, layer in self.sparse_layers.items()}
        kept = self.kept_experts(selection)
        return novice_tables(selection.novices, selection.low_rank, kept, counts, self.device, self.dtype)

    # -- sizing (computed, nothing read) -----------------------------------------------------------

    def variant_bytes(self, selection: Selection | None = None) -> int:
        """Bytes that `build(selection)` allocates beyond the shared backbone."""
        return self.sizes.variant_bytes(selection)

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert of sparse layer `layer` in the target dtype."""
        return self.sizes.expert_bytes(layer)

    @property
    def backbone_bytes(self) -> int:
        """Bytes of the backbone tensors read so far (shared by every variant)."""
        return self.backbone.nbytes

    # -- building ----------------------------------------------------------------------------------

    def build(self, selection: Selection | None = None) -> PreTrainedModel:
        """A runnable model holding the backbone and only what `selection` keeps (all, when None)."""
        selection = self.layout.checked(selection)
        if self.layout.is_moe:
            plan = self.layout.moe_plan(selection)
            # with novices the routers keep every expert's row, so the config keeps the model's count
            config = (
                copy.deepcopy(self.config) if selection.novices else _variant_config(self.config, self.family, plan)
            )
            model = meta_model(config)
            assigned = _assign_experts(self, model, plan, selection.novices)
            return _attach_novices(self, self.complete(model, assigned), plan, selection)
        else:
            model = meta_model(copy.deepcopy(self.config))  # a variant's config is its own (export edits it)
            assigned = _assign_channels(self, model, self.layout.dense_plan(selection))
            assigned |= _assign_bias(self, model, selection.bias)
        return self.complete(model, assigned)

    def complete(self, model: PreTrainedModel, assigned: set[str]) -> PreTrainedModel:
        """Fill every tensor of `model` not in `assigned` with the shared backbone and compute its buffers;
        ready to run."""
        with self._derived_lock:  # two builds at once must not both compute, or skip, a derived buffer
            return self._complete(model, assigned)

    def _complete(self, model: PreTrainedModel, assigned: set[str]) -> PreTrainedModel:
        computed = computed_buffer_names(model)
        # persistent buffers the checkpoint leaves out (MiniMax's lightning decays, 17 MB a layer at its shape):
        # computed once by the module's own init, then shared by every variant like the backbone
        derived = computed_buffer_names(model, lambda name: self.tensors.checkpoint_name(name) is not None) - computed
        for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            if name in assigned or name in computed or (name in derived and name not in self._derived):
                continue
            if name in self.layout.tied and self.tensors.checkpoint_name(name) is None:
                continue  # tied to its source below
            set_tensor(model, name, self._derived[name] if name in derived else self.backbone.tensor(name))
        model.tie_weights()
        fresh = [name for name in derived if name not in self._derived]
        compute_buffers(model, [*computed, *fresh], self.device)
        self._derived |= {name: model.get_buffer(name) for name in fresh}
        if self.generation_config is not None:
            model.generation_config = copy.deepcopy(self.generation_config)
        return model.eval()


def _variant_config(config: PretrainedConfig, family: Family, plan: dict[int, LayerExperts]) -> PretrainedConfig:
    """The config of a MoE variant: the expert count reduced to K when every layer keeps K experts, and the
    router overrides when every layer needs the same."""
    config = copy.deepcopy(config)
    counts = {len(layer.kept) for layer in plan.values()}
    if len(counts) == 1:
        setattr(config, family.experts_field, counts.pop())
    overrides = [layer.overrides for layer in plan.values() if layer.overrides]
    if overrides and all(o == overrides[0] for o in overrides) and len(overrides) == len(plan):
        for key, value in overrides[0].items():
            setattr(config, key, value)
    return config


def _assign_experts(
    builder: VariantBuilder, model: nn.Module, plan: dict[int, LayerExperts], novices: Mapping[int, torch.Tensor]
) -> set[str]:
    """Read the kept experts (projections and any biases) and their router slices into `model` (the whole router
    in the layers with `novices`); returns the names assigned."""
    assigned = set()
    family = builder.family
    for index, layer_plan in plan.items():
        layer, kept = builder.sparse_layers[index], layer_plan.kept
        routed = tuple(range(layer.num_experts)) if index in novices else kept
        tensors = dict(zip(("gate_up_proj", "down_proj"), builder.tensors.read_experts(layer, kept), strict=True))
        for name in family.expert_biases:
            tensors[name] = builder.tensors.read_expert_tensor(layer, name, kept)
        for name, tensor in tensors.items():
            set_tensor(model, f"{layer.prefix}.experts.{name}", tensor)
            assigned.add(f"{layer.prefix}.experts.{name}")
        for tensor in family.router_tensors:
            name = family.router_tensor_name(layer.prefix, tensor)
            # router weights and biases in the target dtype; selection biases as stored
            set_tensor(
                model, name, builder.tensors.read_indices(name, routed, tensor.dim, keep_dtype=tensor.keep_dtype)
            )
            assigned.add(name)
        block = model.get_submodule(layer.prefix)
        block.experts.num_experts = len(kept)
        configure_router(router_of(block, family), len(routed), layer_plan.overrides)
    return assigned


def _attach_novices(
    builder: VariantBuilder, model: PreTrainedModel, plan: dict[int, LayerExperts], selection: Selection
) -> PreTrainedModel:
    """Wrap each layer with novices in `NoviceExperts` (once every tensor is in place: the wrapper renames them)."""
    for index, table in builder.novice_tables(selection).items():
        block = model.get_submodule(builder.sparse_layers[index].prefix)
        block.experts = NoviceExperts(block.experts, plan[index].kept, table)
    return model


def _assign_channels(builder: VariantBuilder, model: nn.Module, plan: dict[int, tuple[int, ...]]) -> set[str]:
    """Read the kept channels of each pruned MLP into `model`; returns the names assigned."""
    assigned = set()
    for index, kept in plan.items():
        layer = builder.dense_layers[index]
        mlp = model.get_submodule(layer.prefix)
        for projection, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            linear = getattr(mlp, projection)
            name = f"{layer.prefix}.{projection}.weight"
            set_tensor(model, name, builder.tensors.read_indices(name, kept, dim))
            assigned.add(name)
            if dim == 1:
                linear.in_features = len(kept)
                continue
            linear.out_features = len(kept)
            if linear.bias is not None:
                bias_name = f"{layer.prefix}.{projection}.bias"
                set_tensor(model, bias_name, builder.tensors.read_indices(bias_name, kept))
                assigned.add(bias_name)
    return assigned


def _assign_bias(builder: VariantBuilder, model: nn.Module, bias: Mapping[int, Sequence[float]]) -> set[str]:
    """SEAP's compensation of the pruned channels: a bias on `down_proj`, added to the model's own if any."""
    assigned = set()
    for index, values in bias.items():
        name = f"{builder.dense_layers[index].prefix}.down_proj.bias"
        down = model.get_submodule(name.removesuffix(".bias"))
        compensation = torch.tensor(values, dtype=builder.dtype, device=builder.device)
        if down.bias is not None:
            compensation = compensation + builder.backbone.tensor(name)
        down.bias = nn.Parameter(compensation, requires_grad=False)
        assigned.add(name)
    return assigned
