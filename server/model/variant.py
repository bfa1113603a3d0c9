"""Building a pruned variant straight from the checkpoint on disk, without ever holding the full model.

The model is constructed on the meta device (no memory), then every parameter is assigned a real tensor:
backbone tensors (embeddings, attention, norms, shared experts, dense MLPs, the LM head) are read once
per builder and shared by every variant it builds; routed experts and router rows are read for the kept
experts only, MLP channels for the kept channels only. Expert tensors are written into one preallocated
fused tensor per layer, so the transient cost of a layer is one expert's tensor.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from pattern_store.selection import Selection, SelectionError
from server.model.checkpoint import CheckpointError, CheckpointReader, contiguous_runs
from server.model.families import Family, check_selection_kind, family_for
from server.model.masking import configure_router

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _paired_runs(experts: Sequence[int], slots: Sequence[int]) -> list[tuple[int, int]]:
    """(first position, length) of the runs where consecutive experts go to consecutive slots."""
    runs: list[tuple[int, int]] = []
    for position in range(len(experts)):
        if runs:
            first, count = runs[-1]
            if experts[position] == experts[first] + count and slots[position] == slots[first] + count:
                runs[-1] = (first, count + 1)
                continue
        runs.append((position, 1))
    return runs


@dataclass(frozen=True)
class SparseLayer:
    """Where a sparse (MoE) layer's experts and router live in the module tree."""

    index: int
    prefix: str  # e.g. "model.layers.3.mlp"
    num_experts: int
    intermediate: int


@dataclass(frozen=True)
class DenseLayer:
    """A dense MLP whose channels can be pruned."""

    index: int
    prefix: str
    intermediate: int


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


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' (or None) is the first GPU when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return device


def _meta_model(config: PretrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name`, whatever its old shape."""
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attribute in owner._parameters:
        owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    elif attribute in owner._buffers:
        owner._buffers[attribute] = tensor
    else:
        raise KeyError(name)


def sparse_layers(model: nn.Module) -> list[SparseLayer]:
    """The MoE blocks of a model: modules with a fused `experts` module and a `gate` router."""
    found = []
    for prefix, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(module, "gate"):
            match = _LAYER.search(f".{prefix}.")
            if match is None:
                raise CheckpointError(f"cannot tell the layer number of MoE block {prefix}")
            shape = experts.down_proj.shape  # [E, H, I]
            found.append(SparseLayer(int(match.group(1)), prefix, int(shape[0]), int(shape[2])))
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


class VariantBuilder:
    """Builds variants of one checkpoint on one device in one dtype; they share the backbone tensors."""

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = "cpu", dtype: Any = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.reader = CheckpointReader(self.model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.family: Family = family_for(self.config.model_type)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.config)
        template = _meta_model(self.config)
        self.sparse_layers = {layer.index: layer for layer in sparse_layers(template)}
        self.dense_layers = {layer.index: layer for layer in dense_layers(template)}
        self._tied = set(getattr(template, "all_tied_weights_keys", {}) or {})
        self._non_persistent_bytes = sum(
            buffer.numel() * buffer.element_size() for _, buffer in template.named_non_persistent_buffers()
        )
        self._backbone: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._staging: torch.Tensor | None = None  # pinned host buffer for copies into GPU memory
        self._staging_lock = threading.Lock()
        generation = self.model_dir / "generation_config.json"
        self.generation_config = GenerationConfig.from_pretrained(self.model_dir) if generation.is_file() else None

    # -- reading -------------------------------------------------------------------------------

    def _to_target(self, tensor: torch.Tensor) -> torch.Tensor:
        """An owning copy on the target device and dtype. safetensors may hand out tensors that point
        into the file's mmap; a variant must not (a rewritten file would change or crash it)."""
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        out = tensor.to(device=self.device, dtype=dtype)
        return out.clone() if out.data_ptr() == tensor.data_ptr() else out

    def _checkpoint_name(self, module_name: str) -> str | None:
        for candidate in self.family.checkpoint_candidates(module_name):
            if candidate in self.reader:
                return candidate
        return None

    def _required_name(self, module_name: str) -> str:
        name = self._checkpoint_name(module_name)
        if name is None:
            raise CheckpointError(f"{self.model_dir}: the checkpoint has no tensor for {module_name}")
        return name

    def backbone_tensor(self, module_name: str) -> torch.Tensor:
        """A backbone tensor, read from disk the first time and shared afterwards."""
        with self._lock:
            tensor = self._backbone.get(module_name)
            if tensor is None:
                tensor = self._to_target(self.reader.read(self._required_name(module_name)))
                self._backbone[module_name] = tensor
            return tensor

    def _expert_names(self, layer: SparseLayer, expert: int) -> list[str] | None:
        """Checkpoint names of one expert's gate, up and down tensors, when stored per expert."""
        for prefix in self.family.checkpoint_candidates(f"{layer.prefix}.experts"):
            names = [f"{prefix}.{expert}.{projection}.weight" for projection in self.family.expert_projections]
            if all(n in self.reader for n in names):
                return names
        return None

    def read_experts(self, layer: SparseLayer, kept: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused `gate_up_proj` [K, 2I, H] and `down_proj` [K, H, I] of the kept experts, in `kept` order."""
        fused_gate_up = self._checkpoint_name(f"{layer.prefix}.experts.gate_up_proj")
        fused_down = self._checkpoint_name(f"{layer.prefix}.experts.down_proj")
        if fused_gate_up and fused_down:
            return self._read_fused(fused_gate_up, kept), self._read_fused(fused_down, kept)
        size, hidden = layer.intermediate, self.config.hidden_size
        gate_up = torch.empty((len(kept), 2 * size, hidden), dtype=self.dtype, device=self.device)
        down = torch.empty((len(kept), hidden, size), dtype=self.dtype, device=self.device)
        for slot, expert in enumerate(kept):
            names = self._expert_names(layer, expert)
            if names is None:
                raise CheckpointError(f"{self.model_dir}: no tensors for expert {expert} of {layer.prefix}")
            gate_up[slot, :size].copy_(self.reader.read(names[0]))
            gate_up[slot, size:].copy_(self.reader.read(names[1]))
            down[slot].copy_(self.reader.read(names[2]))
        return gate_up, down

    def _read_fused(self, name: str, kept: Sequence[int]) -> torch.Tensor:
        """Kept experts of a fused [E, ...] checkpoint tensor, each run of consecutive experts copied once,
        straight into the preallocated result."""
        shape = self.reader.info(name).shape
        out = torch.empty((len(kept), *shape[1:]), dtype=self.dtype, device=self.device)
        slot = 0
        for start, stop in contiguous_runs(kept):
            out[slot : slot + stop - start].copy_(self.reader.read_rows(name, start, stop))
            slot += stop - start
        return out

    # -- checking a selection ------------------------------------------------------------------

    def _moe_plan(self, selection: Selection) -> dict[int, tuple[tuple[int, ...], dict[str, Any]]]:
        """Per sparse layer: the kept experts and the router overrides the routing rule needs."""
        unknown = sorted(set(selection.layers) - set(self.sparse_layers))
        if unknown:
            raise SelectionError(
                f"the selection names layers {unknown} that have no routed experts; sparse layers are "
                f"{sorted(self.sparse_layers)}"
            )
        top_k = int(self.config.num_experts_per_tok)
        plan = {}
        for index, layer in self.sparse_layers.items():
            kept = selection.kept(index) or tuple(range(layer.num_experts))
            if kept[-1] >= layer.num_experts:
                raise SelectionError(f"layer {index}: expert {kept[-1]} does not exist ({layer.num_experts} experts)")
            if len(kept) < top_k:
                raise SelectionError(f"layer {index}: keeps {len(kept)} experts, fewer than the top-{top_k} routing")
            overrides = self.family.routing_overrides(self.config, index, kept) if len(kept) < layer.num_experts else {}
            plan[index] = (kept, overrides)
        return plan

    def kept_experts(self, selection: Selection | None) -> dict[int, tuple[int, ...]]:
        """Per sparse layer that a MoE selection prunes, its kept experts (sorted), checked against the model
        and its routing rule; None (the full model) prunes nothing."""
        if selection is None:
            return {}
        check_selection_kind(self.family, selection)
        return {
            index: kept
            for index, (kept, _) in self._moe_plan(selection).items()
            if len(kept) < self.sparse_layers[index].num_experts
        }

    def _dense_plan(self, selection: Selection) -> dict[int, tuple[int, ...]]:
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

    def _variant_config(self, plan: dict[int, tuple[tuple[int, ...], dict[str, Any]]] | None) -> PretrainedConfig:
        """The config of the variant: the expert count reduced to K (when every layer keeps K experts)."""
        config = copy.deepcopy(self.config)
        if plan is None:
            return config
        counts = {len(kept) for kept, _ in plan.values()}
        if len(counts) == 1:
            setattr(config, self.family.experts_field, counts.pop())
        overrides = [o for _, o in plan.values() if o]
        if overrides and all(o == overrides[0] for o in overrides) and len(overrides) == len(plan):
            for key, value in overrides[0].items():
                setattr(config, key, value)
        return config

    # -- sizing --------------------------------------------------------------------------------

    def variant_bytes(self, selection: Selection | None = None) -> int:
        """Bytes that `build(selection)` allocates beyond the shared backbone, computed without reading
        anything: the variant cache admits (or refuses) a variant against its budget before building it."""
        kind = "moe_experts" if self.family.kind == "moe" else "dense_channels"
        selection = selection or Selection(kind=kind, layers={})
        check_selection_kind(self.family, selection)
        item = torch.empty((), dtype=self.dtype).element_size()
        hidden = int(self.config.hidden_size)
        total = self._non_persistent_bytes
        if self.family.kind == "moe":
            for index, (kept, _) in self._moe_plan(selection).items():
                layer = self.sparse_layers[index]
                total += len(kept) * (3 * layer.intermediate * hidden + hidden) * item
                for attribute in self.family.router_expert_buffers:
                    info = self.reader.info(self._required_name(f"{layer.prefix}.gate.{attribute}"))
                    total += len(kept) * info.nbytes // max(1, info.shape[0])
            return total
        for index, kept in self._dense_plan(selection).items():
            prefix = self.dense_layers[index].prefix
            total += 3 * len(kept) * hidden * item
            for projection in ("gate_proj", "up_proj"):
                if self._checkpoint_name(f"{prefix}.{projection}.bias") is not None:
                    total += len(kept) * item
        return total + len(selection.bias) * hidden * item

    def owned_bytes(self, model: nn.Module) -> int:
        """Bytes a built variant holds that no other variant shares (measured, not computed)."""
        with self._lock:
            shared = {tensor.untyped_storage().data_ptr() for tensor in self._backbone.values()}
        seen: set[int] = set()
        total = 0
        for tensor in [*model.parameters(), *model.buffers()]:
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in shared or pointer in seen or tensor.is_meta:
                continue
            seen.add(pointer)
            total += tensor.untyped_storage().nbytes()
        return total

    @property
    def backbone_bytes(self) -> int:
        """Bytes of the backbone tensors read so far (shared by every variant)."""
        with self._lock:
            return sum(t.untyped_storage().nbytes() for t in self._backbone.values())

    # -- building ------------------------------------------------------------------------------

    def build(self, selection: Selection | None = None) -> PreTrainedModel:
        """A runnable model holding the backbone and only what `selection` keeps (all, when None)."""
        kind = "moe_experts" if self.family.kind == "moe" else "dense_channels"
        selection = selection or Selection(kind=kind, layers={})
        check_selection_kind(self.family, selection)
        plan = self._moe_plan(selection) if self.family.kind == "moe" else None
        model = _meta_model(self._variant_config(plan))
        if plan is not None:
            variant_names = self._assign_experts(model, plan)
        else:
            variant_names = self._assign_channels(model, self._dense_plan(selection), selection)
        return self._with_backbone(model, variant_names)

    def _with_backbone(self, model: PreTrainedModel, assigned: set[str]) -> PreTrainedModel:
        """Fill every tensor of `model` not in `assigned` with the shared backbone; ready to run."""
        non_persistent = self._non_persistent(model)
        for name, _ in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
            if name in assigned or name in non_persistent:
                continue
            if name in self._tied and self._checkpoint_name(name) is None:
                continue  # tied to its source below
            _set_tensor(model, name, self.backbone_tensor(name))
        model.tie_weights()
        self._init_non_persistent_buffers(model)
        if self.generation_config is not None:
            model.generation_config = copy.deepcopy(self.generation_config)
        return model.eval()

    # -- the expert pool: every router whole, routed experts in slots -----------------------------

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert of sparse layer `layer` in the target dtype (its gate, up and down)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return 3 * self.sparse_layers[layer].intermediate * int(self.config.hidden_size) * item

    def build_pooled(self, slots: int) -> PreTrainedModel:
        """The full model with `slots` expert slots per sparse layer in place of its experts: preallocated and
        touched (zeroed), so that loading an expert later is a copy and never a page fault. Routers keep
        every expert's row (they are part of the backbone); which expert sits in which slot is the pool's
        business (`server.model.pooled`)."""
        if self.family.kind != "moe":
            raise ValueError(f"{self.family.name} has no routed experts to pool")
        model = _meta_model(self.config)
        hidden = int(self.config.hidden_size)
        assigned = set()
        for layer in self.sparse_layers.values():
            count = min(slots, layer.num_experts)
            size = layer.intermediate
            # [slots, 2I, H] and [slots, H, I]: the layout of transformers' fused experts modules
            gate_up = torch.zeros((count, 2 * size, hidden), dtype=self.dtype, device=self.device)
            down = torch.zeros((count, hidden, size), dtype=self.dtype, device=self.device)
            _set_tensor(model, f"{layer.prefix}.experts.gate_up_proj", gate_up)
            _set_tensor(model, f"{layer.prefix}.experts.down_proj", down)
            model.get_submodule(layer.prefix).experts.num_experts = count
            assigned.update({f"{layer.prefix}.experts.gate_up_proj", f"{layer.prefix}.experts.down_proj"})
        return self._with_backbone(model, assigned)

    def load_experts(
        self,
        layer: SparseLayer,
        experts: Sequence[int],
        slots: Sequence[int],
        gate_up: torch.Tensor,
        down: torch.Tensor,
    ) -> None:
        """Copy `experts[i]` into slot `slots[i]` of a pooled layer's `gate_up` [S, 2I, H] and `down` [S, H, I],
        straight from the checkpoint's memory map: runs of consecutive experts going to consecutive slots
        are one copy each. On a GPU the bytes pass through a pinned host buffer."""
        fused_gate_up = self._checkpoint_name(f"{layer.prefix}.experts.gate_up_proj")
        fused_down = self._checkpoint_name(f"{layer.prefix}.experts.down_proj")
        size = layer.intermediate
        for first, count in _paired_runs(experts, slots):
            expert, slot = experts[first], slots[first]
            if fused_gate_up and fused_down:
                self._copy(gate_up[slot : slot + count], self.reader.rows_view(fused_gate_up, expert, expert + count))
                self._copy(down[slot : slot + count], self.reader.rows_view(fused_down, expert, expert + count))
                continue
            for offset in range(count):
                names = self._expert_names(layer, expert + offset)
                if names is None:
                    raise CheckpointError(
                        f"{self.model_dir}: no tensors for expert {expert + offset} of {layer.prefix}"
                    )
                target = slot + offset
                self._copy(gate_up[target, :size], self.reader.rows_view(names[0], 0, size))
                self._copy(gate_up[target, size:], self.reader.rows_view(names[1], 0, size))
                self._copy(down[target], self.reader.rows_view(names[2], 0, self.reader.info(names[2]).shape[0]))

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """`target.copy_(source)`; into GPU memory through one reused pinned host buffer (pinned memory is
        costly to allocate, and a copy from pageable memory is staged by the driver anyway)."""
        if target.device.type != "cuda":
            target.copy_(source)
            return
        nbytes = target.numel() * target.element_size()
        with self._staging_lock:
            if self._staging is None or self._staging.numel() < nbytes:
                self._staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            staging = self._staging[:nbytes].view(target.dtype).view(target.shape)
            staging.copy_(source)
            target.copy_(staging, non_blocking=True)
            torch.cuda.current_stream(target.device).synchronize()  # before the buffer is written again

    def _assign_experts(self, model: nn.Module, plan: dict[int, tuple[tuple[int, ...], dict[str, Any]]]) -> set[str]:
        assigned = set()
        for index, (kept, overrides) in plan.items():
            layer = self.sparse_layers[index]
            gate_up, down = self.read_experts(layer, kept)
            block = model.get_submodule(layer.prefix)
            _set_tensor(model, f"{layer.prefix}.experts.gate_up_proj", gate_up)
            _set_tensor(model, f"{layer.prefix}.experts.down_proj", down)
            router_names = ["weight", *self.family.router_expert_buffers]
            for attribute in router_names:
                name = f"{layer.prefix}.gate.{attribute}"
                rows = self.reader.read_indices(self._required_name(name), kept)
                _set_tensor(
                    model, name, self._to_target(rows) if attribute == "weight" else rows.to(self.device, copy=True)
                )
                assigned.add(name)
            block.experts.num_experts = len(kept)
            configure_router(block.gate, len(kept), overrides)
            assigned.update({f"{layer.prefix}.experts.gate_up_proj", f"{layer.prefix}.experts.down_proj"})
        return assigned

    def _assign_channels(self, model: nn.Module, plan: dict[int, tuple[int, ...]], selection: Selection) -> set[str]:
        assigned = set()
        for index, kept in plan.items():
            layer = self.dense_layers[index]
            mlp = model.get_submodule(layer.prefix)
            for projection, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                linear = getattr(mlp, projection)
                name = f"{layer.prefix}.{projection}.weight"
                _set_tensor(
                    model, name, self._to_target(self.reader.read_indices(self._required_name(name), kept, dim))
                )
                assigned.add(name)
                if dim == 0:
                    linear.out_features = len(kept)
                    if linear.bias is not None:
                        bias_name = f"{layer.prefix}.{projection}.bias"
                        bias = self.reader.read_indices(self._required_name(bias_name), kept)
                        _set_tensor(model, bias_name, self._to_target(bias))
                        assigned.add(bias_name)
                else:
                    linear.in_features = len(kept)
        for index, values in selection.bias.items():
            down = model.get_submodule(f"{self.dense_layers[index].prefix}.down_proj")
            name = f"{self.dense_layers[index].prefix}.down_proj.bias"
            compensation = torch.tensor(values, dtype=self.dtype, device=self.device)
            if down.bias is not None:  # the model's own bias, plus the compensation
                compensation = compensation + self.backbone_tensor(name)
            down.bias = nn.Parameter(compensation, requires_grad=False)
            assigned.add(name)
        return assigned

    # -- one module at a time (layer-by-layer calibration) --------------------------------------

    def skeleton(self) -> PreTrainedModel:
        """The full model on the meta device: costs no memory; `materialise` fills one part of it."""
        return _meta_model(self.config)

    def materialise(self, model: PreTrainedModel, prefix: str) -> None:
        """Read every tensor under `prefix` (all experts kept) into `model`, bypassing the backbone cache,
        so that `release` gives the memory back."""
        sparse = {layer.prefix: layer for layer in self.sparse_layers.values()}
        non_persistent = self._non_persistent(model)
        persistent = {name for name, _ in model.named_parameters()} | {
            name for name, _ in model.named_buffers() if name not in non_persistent
        }
        for name in sorted(persistent):
            if not name.startswith(f"{prefix}."):
                continue
            block_prefix = name.rsplit(".experts.", 1)[0]
            if block_prefix in sparse and name.endswith(".experts.gate_up_proj"):
                layer = sparse[block_prefix]
                gate_up, down = self.read_experts(layer, range(layer.num_experts))
                _set_tensor(model, name, gate_up)
                _set_tensor(model, f"{block_prefix}.experts.down_proj", down)
            elif block_prefix in sparse and name.endswith(".experts.down_proj"):
                continue  # read with gate_up_proj
            elif name in self._tied and self._checkpoint_name(name) is None:
                continue
            else:
                _set_tensor(model, name, self._to_target(self.reader.read(self._required_name(name))))
        owners = {n.rpartition(".")[0] for n in non_persistent if n.startswith(f"{prefix}.")}
        for owner in owners:
            for buffer_name, buffer in list(model.get_submodule(owner).named_buffers(recurse=False)):
                _set_tensor(model, f"{owner}.{buffer_name}", torch.empty_like(buffer, device=self.device))
            model._init_weights(model.get_submodule(owner))

    @staticmethod
    def release(model: PreTrainedModel, prefix: str) -> None:
        """Put every tensor under `prefix` back on the meta device, freeing its memory."""
        module = model.get_submodule(prefix)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            _set_tensor(module, name, torch.empty_like(tensor, device="meta"))

    @staticmethod
    def _non_persistent(model: PreTrainedModel) -> set[str]:
        return {name for name, _ in model.named_non_persistent_buffers()}

    def _init_non_persistent_buffers(self, model: PreTrainedModel) -> None:
        """Rotary frequencies and the like: not in the checkpoint, computed by transformers' own init."""
        owners = set()
        for name, buffer in list(model.named_non_persistent_buffers()):
            _set_tensor(model, name, torch.empty_like(buffer, device=self.device))
            owners.add(name.rpartition(".")[0])
        for owner in owners:
            model._init_weights(model.get_submodule(owner))
