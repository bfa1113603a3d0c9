"""One model whose routed experts sit in preallocated slots, each row of a batch routed as its own variant.

A pruned variant computes what the full model computes when its routers cannot select the pruned experts
(the equivalence contract, see `masking`). So variants need not be separate models: one model holds the
backbone once and, per sparse layer, `slots` expert slots; a table maps each resident expert to its slot.
Every row of a batch carries a `RowRoute` (its pattern's kept experts). Each router runs once for the whole
batch, the family's own routing code with each row's pruned experts masked (`route_masks`: the very choices
and gate weights of the pruned variant, group-limited routing and selection bias included, in the same
operations whatever the number of routes), and turns the chosen experts into slots. The experts module then
runs all rows together, reading each chosen expert from its slot. Rows of different patterns share one forward pass.

The pooled model is built here (`build_pooled`: the shared backbone, and zeroed slots in place of the
experts); experts are copied into slots by `slot_loader`; which expert goes into which slot, and when, is
decided by `server.expert_pool.ExpertPool`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from server.model.coverage_meter import CoverageMeter, CoverageSample
from server.model.layout import SparseLayer
from server.model.masking import RouterMasks, router_of
from server.model.module_tree import meta_model, set_tensor
from server.model.novices import NoviceTable, batch_term
from server.model.quantized_slots import (
    AUTO,
    QUANTIZED_TENSORS,
    DequantizingExperts,
    SlotFormat,
    checkpoint_experts_format,
    load_quantized,
    quantized_expert_bytes,
    quantized_experts,
    resolve_expert_format,
)
from server.model.route_masks import BatchMasks, MaskedRouting, RouteMaskTable, masked_arguments
from server.model.slot_loader import SlotLoader
from server.model.variant import VariantBuilder


def build_pooled(builder: VariantBuilder, slots: int, quantized: SlotFormat | None = None) -> PreTrainedModel:
    """The full model with `slots` expert slots per sparse layer in place of its experts: preallocated and
    touched (zeroed), so that loading an expert later is a copy and never a page fault. Routers keep every
    expert's row (they are part of the backbone). With `quantized`, the projections' slots hold the
    checkpoint's FP8 or MXFP4 bytes and scales, and each layer's experts module dequantizes the slots a pass
    chooses (`DequantizingExperts`)."""
    if builder.family.kind != "moe":
        raise ValueError(f"{builder.family.name} has no routed experts to pool")
    model = meta_model(builder.config)
    assigned = set()
    for layer in builder.sparse_layers.values():
        count = min(slots, layer.num_experts)
        # one slot per expert in each of the experts module's per-expert tensors, in the module's own layout
        # (quantized slots: empty placeholders for the projections, whose slots live in DequantizingExperts)
        for name, shape in layer.expert_shapes.items():
            placeholder = quantized is not None and name in QUANTIZED_TENSORS
            slot = torch.zeros((0,) if placeholder else (count, *shape), dtype=builder.dtype, device=builder.device)
            set_tensor(model, f"{layer.prefix}.experts.{name}", slot)
            assigned.add(f"{layer.prefix}.experts.{name}")
        model.get_submodule(layer.prefix).experts.num_experts = count
    model = builder.complete(model, assigned)
    if quantized is not None:
        for layer in builder.sparse_layers.values():
            block = model.get_submodule(layer.prefix)
            count = min(slots, layer.num_experts)
            block.experts = quantized_experts(block.experts, quantized, builder.tensors, layer, count)
    return model


def pool_expert_format(builder: VariantBuilder, expert_dtype: str = AUTO) -> SlotFormat | None:
    """What the slots of a pool of `builder`'s model hold for `--expert-dtype expert_dtype`: the checkpoint's
    FP8 or MXFP4 (None: the model's dtype)."""
    layers = list(builder.sparse_layers.values())
    stored = checkpoint_experts_format(builder.tensors, layers)
    return resolve_expert_format(expert_dtype, stored, builder.dtype)


def slot_expert_bytes(builder: VariantBuilder, layer: int, quantized: SlotFormat | None) -> int:
    """Bytes of one expert slot of sparse layer `layer`: quantized bytes and scales, or the model's dtype."""
    if quantized is None:
        return builder.expert_bytes(layer)
    return quantized_expert_bytes(quantized, builder.tensors, builder.sparse_layers[layer])


@dataclass(frozen=True)
class RowRoute:
    """The experts the rows of one request may route to: per sparse layer its kept experts, sorted; a layer
    that is not named keeps every expert."""

    label: str
    kept: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    revision: str = ""  # which stored revision of the pattern (live coverage starts again on a new one)
    calibrated: float | None = None  # the coverage the pattern recorded at calibration (`coverage_meter`)
    #: per layer whose pruned choices get novices, its `novices.NoviceTable` (on the pool's device): those
    #: layers route as the full router does, and a pruned choice adds gate weight x novice
    novices: Mapping[int, NoviceTable] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def masked(self) -> Mapping[int, tuple[int, ...]]:
        """The layers whose router may choose only the kept experts (those without novices)."""
        return {layer: kept for layer, kept in self.kept.items() if layer not in self.novices}


class PooledModel:
    """The model, its slot tensors and the expert-to-slot tables; run it through `rows(...)` or `routed(...)`."""

    def __init__(self, builder: VariantBuilder, slots: int, expert_dtype: str = AUTO) -> None:
        if slots < 1:
            raise ValueError("an expert pool needs at least one slot per layer")
        self.builder = builder
        self.quantized = pool_expert_format(builder, expert_dtype)
        self.model = build_pooled(builder, slots, self.quantized)
        self.loader = SlotLoader(builder.tensors)
        self.layers: dict[int, SparseLayer] = dict(builder.sparse_layers)
        self.slots = {index: min(slots, layer.num_experts) for index, layer in self.layers.items()}
        device = builder.device
        # per layer [num_experts]: the slot holding each expert, -1 where it is not resident
        self.slot_of = {
            index: torch.full((layer.num_experts,), -1, dtype=torch.long, device=device)
            for index, layer in self.layers.items()
        }
        self.route_masks = RouteMaskTable(self.layers, device)
        #: what live coverage compares the full router's choice with: the kept experts, novices or not
        self.coverage_masks = RouteMaskTable(self.layers, device, every_kept=True)
        #: samples the full router's choices beside the masked ones (None: off, nothing extra runs)
        self.coverage: CoverageMeter | None = None
        self._restricted_routers = RouterMasks(
            self.model, builder.family, builder.config, {index: layer.prefix for index, layer in self.layers.items()}
        )
        self._restricted_routers.cache_size = 64 * max(1, len(self.layers))  # many patterns' restricted routers
        self._restricted_lock = threading.Lock()  # that cache is shared by every thread
        #: route every batch by masks, a batch of one pattern too (a captured CUDA graph reads masks only)
        self.masked_only = False
        self._local = threading.local()  # the current forward pass's routes, one per row, per thread
        for index, layer in self.layers.items():
            block = self.model.get_submodule(layer.prefix)
            router = router_of(block, builder.family)
            router.forward = self._routing(index, router.forward)  # this instance only; the class stays as it was
            block.experts.register_forward_hook(self._adding_novices(index))

    @property
    def device(self) -> torch.device:
        return self.builder.device

    @property
    def expert_dtype(self) -> str:
        """What a slot holds: `fp8` or `mxfp4` (values and scales as the checkpoint stores them), or the model's
        dtype."""
        return self.quantized.name if self.quantized is not None else str(self.builder.dtype).removeprefix("torch.")

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one slot of sparse layer `layer`."""
        return slot_expert_bytes(self.builder, layer, self.quantized)

    @property
    def slot_bytes(self) -> int:
        """Bytes of all slot memory (every layer)."""
        return sum(self.slots[index] * self.expert_bytes(index) for index in self.layers)

    # -- running ---------------------------------------------------------------------------------

    @contextmanager
    def rows(self, routes: Sequence[RowRoute], attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Forward passes of this thread inside the block route row i of the batch as `routes[i]`
        (`attention_mask`: which of the rows' tokens are real, for coverage sampling)."""
        with self.batch_masks(BatchMasks(routes, self.route_masks), attention_mask=attention_mask):
            yield

    @contextmanager
    def batch_masks(
        self, masks: BatchMasks, sample: bool | None = None, attention_mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Forward passes of this thread inside the block route their rows by `masks` (which a captured
        graph keeps: `decode_graph.RouteBuffer`). `sample`: whether the pass records coverage (None: the
        meter draws; a captured graph passes False)."""
        previous = getattr(self._local, "batch", None)
        meter = self.coverage
        pruning = masks.pruning or bool(masks.novice_layers)
        sampled = meter is not None and pruning and (meter.draw() if sample is None else sample)
        coverage = CoverageSample(masks.routes, attention_mask) if sampled else None
        # rows with novices route unmasked; their coverage is still that of the experts they keep
        kept = BatchMasks(masks.routes, self.coverage_masks) if sampled and masks.novice_layers else masks
        saved = tuple(getattr(self._local, name, None) for name in ("novice_terms", "kept"))
        self._local.batch, self._local.coverage = masks, coverage
        self._local.novice_terms, self._local.kept = {}, kept
        try:
            yield
        finally:
            self._local.batch, self._local.coverage = previous, None
            self._local.novice_terms, self._local.kept = saved
        if coverage is not None and meter is not None:
            meter.finish(coverage)

    def routed(self, route: RowRoute) -> RoutedModel:
        """A model-like view that runs every row of every batch as `route`."""
        return RoutedModel(self, route)

    def _restricted(self, layer: int, kept: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
        with self._restricted_lock:
            return self._restricted_routers._restricted(layer, kept)

    def _routing(self, layer: int, full_router: Callable[..., Any]) -> Callable[..., Any]:
        """The router's forward for this layer: the full router, run once for every row, with each row's
        pruned experts masked (`route_masks`), and the chosen experts turned into slots. Arguments the block
        passes after the hidden states (MiniMax-M2's selection bias) are masked the same way. A batch whose
        rows all follow one pattern runs that pattern's restricted router instead (`masking`: the same
        choices, without the masks' cost); its logits are over the kept experts, which the blocks ignore."""
        table = self.slot_of[layer]
        router = router_of(self.model.get_submodule(self.layers[layer].prefix), self.builder.family)
        named = dict(router.named_parameters()) | dict(router.named_buffers())
        biases = [named[t.path] for t in self.builder.family.router_tensors if t.selects and t.owner == "router"]

        def forward(hidden_states: torch.Tensor, *arguments: Any) -> Any:
            batch: BatchMasks | None = getattr(self._local, "batch", None)
            if batch is None:
                raise RuntimeError("a pooled model runs inside PooledModel.rows(...) (each row needs its route)")
            count = hidden_states.numel() // hidden_states.shape[-1]
            coverage: CoverageSample | None = getattr(self._local, "coverage", None)
            if coverage is not None:  # the full router's own choice, for the patterns' live coverage
                _, full_weights, full_experts = full_router(hidden_states, *arguments)
                coverage.add(layer, full_weights, full_experts, self._local.kept.tokens(layer, count))
            single = batch.single.masked.get(layer) if batch.single is not None and not self.masked_only else None
            if single is not None:
                restricted, ids = self._restricted(layer, single)
                logits, weights, positions = restricted(hidden_states.reshape(-1, hidden_states.shape[-1]))
                return logits, weights, _slots(table, ids[positions])
            pruned = batch.tokens(layer, count)
            if pruned is None:
                logits, weights, experts = full_router(hidden_states, *arguments)
            else:
                with MaskedRouting(pruned, biases):
                    logits, weights, experts = full_router(hidden_states, *masked_arguments(arguments, pruned))
            novices = batch.novices(layer, count)
            if novices is None:
                return logits, weights, _slots(table, experts)
            # rows whose pattern has novices here: a pruned choice adds gate weight x novice (after the experts
            # run, `_adding_novices`) and runs slot 0 at weight 0 in place of an expert that may not be resident
            substituted = novices.substitutes[novices.route_of_token].gather(1, experts)
            self._local.novice_terms[layer] = (novices, weights, experts, substituted)
            return logits, weights.masked_fill(substituted, 0.0), _slots(table, experts, substituted)

        return forward

    def _adding_novices(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], Any]:
        """A hook on the layer's experts module that adds the novices its router's rows asked for."""

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            terms = getattr(self._local, "novice_terms", None)
            pending = terms.pop(layer, None) if terms is not None else None
            if pending is None:
                return None
            novices, weights, experts, substituted = pending
            hidden = args[0].reshape(-1, args[0].shape[-1])
            term = batch_term(novices.tables, novices.tokens, hidden, weights, experts, substituted)
            return output + term.to(output.dtype).reshape(output.shape)

        return hook

    # -- loading ---------------------------------------------------------------------------------

    def load(self, layer: int, experts: Sequence[int], slots: Sequence[int]) -> None:
        """Copy `experts` from the checkpoint into `slots` of `layer` (the caller owns those slots)."""
        block = self.model.get_submodule(self.layers[layer].prefix).experts
        if isinstance(block, DequantizingExperts) and self.quantized is not None:
            copies = self.loader.batch()
            load_quantized(self.builder.tensors, self.layers[layer], experts, slots, block, self.quantized, copies)
            copies.run()
            return
        targets = {name: getattr(block, name).data for name in self.builder.family.expert_tensors}
        self.loader.load(self.layers[layer], experts, slots, targets)

    def place(self, layer: int, expert: int, slot: int) -> None:
        """Make `expert` route to `slot` (-1: not resident) from the next forward pass on."""
        self.slot_of[layer][expert] = slot


def _slots(table: torch.Tensor, experts: torch.Tensor, substituted: torch.Tensor | None = None) -> torch.Tensor:
    """The slots of the chosen experts. A row only ever runs while its pattern's experts are pinned in the
    pool; on the CPU (where it costs nothing) a miss is caught rather than read from a wrong slot. A choice a
    novice answers (`substituted`) runs slot 0 at weight 0: its expert need not be resident."""
    slots = table[experts] if substituted is None else table[experts].masked_fill(substituted, 0)
    if slots.device.type == "cpu" and bool((slots < 0).any()):
        missing = sorted(set(experts[slots < 0].tolist()))
        raise RuntimeError(f"experts {missing} were routed to but are not resident in the pool")
    return slots


class RoutedModel:
    """What `Generation` and the batched decoder need of a model, with every row routed as one `RowRoute`."""

    def __init__(self, pooled: PooledModel, route: RowRoute) -> None:
        self.pooled, self.route = pooled, route
        self.config = pooled.model.config

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.pooled.model.parameters()

    def __call__(self, **inputs: Any) -> Any:
        reference = inputs.get("input_ids")
        rows = int(reference.shape[0]) if reference is not None else int(inputs["inputs_embeds"].shape[0])
        with self.pooled.rows([self.route] * rows):
            return self.pooled.model(**inputs)
