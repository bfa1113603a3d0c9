"""Routers that choose among kept experts only: the computation of a pruned variant, without building one.

A pruned variant computes what the full model computes when its routers cannot select the pruned experts
(the equivalence contract). This module provides that routing for a model that holds every expert:

- `restricted_router(block, family, kept, overrides)`: a router over the kept experts only, built from the
  router's own rows (and every other per-expert tensor the family names) and run by transformers' own
  routing code, whose choices are positions in `kept`, exactly as in a variant built with those experts;
- `RouterMasks`: forward hooks on a full model's routers that replace each selection by the restricted
  router's, mapped back to expert ids, so that one full model answers as any selection's variant would.

Refinement (`local_refinement`, `answer_loss_refinement`) scores thousands of candidate selections this way
without building or reading anything; the variant builder configures its routers with `configure_router`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from server.model.families import Family

#: config fields that `Family.routing_overrides` may return, and the router attribute each one sets
ROUTER_ATTRIBUTES = {"n_group": "num_group", "topk_group": "topk_group"}


def configure_router(router: nn.Module, num_experts: int, overrides: Mapping[str, Any]) -> None:
    """Tell a router it now holds `num_experts` rows, and apply the routing rule's overrides (expert groups)."""
    router.num_experts = num_experts
    for key, value in overrides.items():
        setattr(router, ROUTER_ATTRIBUTES[key], value)


def router_of(block: nn.Module, family: Family) -> nn.Module:
    """The router module of a MoE block."""
    return getattr(block, family.router)


def _restricted_copy(module: nn.Module, tensors: Mapping[str, int], index: torch.Tensor) -> nn.Module:
    """A shallow copy of `module` (same class, attributes, children, parameters and buffers) whose tensors
    `tensors` (path -> experts' dimension, paths into children allowed) keep only the slices `index`."""
    clone = type(module).__new__(type(module))
    nn.Module.__init__(clone)
    for key, value in vars(module).items():
        if not key.startswith("_") and key != "forward":  # a pooled model's router has its own forward
            setattr(clone, key, value)
    for name, child in module.named_children():
        inner = {path.split(".", 1)[1]: dim for path, dim in tensors.items() if path.split(".", 1)[0] == name}
        clone.add_module(name, _restricted_copy(child, inner, index) if inner else child)
    for name, parameter in module._parameters.items():  # None entries too (a Linear without bias)
        if name in tensors and parameter is not None:
            parameter = nn.Parameter(parameter.detach().index_select(tensors[name], index), requires_grad=False)
        clone.register_parameter(name, parameter)
    for name, buffer in module._buffers.items():
        if name in tensors and buffer is not None:
            buffer = buffer.index_select(tensors[name], index)
        clone.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    if isinstance(clone, nn.Linear):
        clone.out_features = len(index)
    return clone


class _BoundRouter(nn.Module):
    """A router whose block passes it per-expert tensors (MiniMax-M2's selection bias) as arguments: called
    with the hidden states alone, it adds them."""

    def __init__(self, router: nn.Module, arguments: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.router = router
        self.arguments = list(arguments)

    def forward(self, hidden_states: torch.Tensor) -> Any:
        return self.router(hidden_states, *self.arguments)


def full_router(block: nn.Module, family: Family) -> Callable[[torch.Tensor], Any]:
    """The block's router as the block calls it, given the hidden states alone (its arguments added)."""
    router = router_of(block, family)
    if not family.router_arguments:
        return router
    return _BoundRouter(router, [getattr(block, name) for name in family.router_arguments])


def restricted_router(block: nn.Module, family: Family, kept: Sequence[int], overrides: Mapping[str, Any]) -> nn.Module:
    """A router of the block's router's class that scores only the `kept` experts (their weight rows and
    every other per-expert tensor the family names: selection biases, router biases, on the router, a child
    of it or the block); called with the hidden states alone, its selections are positions in `kept`."""
    router = router_of(block, family)
    device = next(iter(router.parameters())).device
    index = torch.as_tensor(list(kept), dtype=torch.long, device=device)
    owned = {t.path: t.dim for t in family.router_tensors if t.owner == "router"}
    clone = _restricted_copy(router, owned, index)
    configure_router(clone, len(index), overrides)
    clone.eval()
    if not family.router_arguments:
        return clone
    dims = {t.path: t.dim for t in family.router_tensors if t.owner == "block"}
    arguments = [getattr(block, name).index_select(dims[name], index) for name in family.router_arguments]
    return _BoundRouter(clone, arguments).eval()


class RouterMasks:
    """Forward hooks that restrict the routers of a model holding every expert to a selection's kept experts.

    `masks.apply({layer: kept, ...})` sets the selection (layers not named route freely); while the hooks are
    installed (`with masks:`), every forward pass routes as that selection's variant. The restricted routers
    of the last `cache_size` (layer, kept) pairs are kept, so switching back and forth costs nothing.
    """

    cache_size = 256

    def __init__(self, model: nn.Module, family: Family, config: Any, routers: Mapping[int, str]) -> None:
        """`routers` maps each sparse layer's index to its MoE block's module name (`model.layers.3.mlp`)."""
        self.model = model
        self.family = family
        self.config = config
        self.blocks = {index: model.get_submodule(prefix) for index, prefix in routers.items()}
        self._current: dict[int, tuple[int, ...]] = {}
        self._cache: OrderedDict[tuple[int, tuple[int, ...]], tuple[nn.Module, torch.Tensor]] = OrderedDict()
        self._handles: list[Any] = []

    def apply(self, selection: Mapping[int, Sequence[int]]) -> None:
        """Route as the variant that keeps `selection[layer]` in each named layer (checked against the rule)."""
        current = {}
        for layer, kept in selection.items():
            if layer not in self.blocks:
                raise KeyError(f"layer {layer} has no routed experts")
            kept = tuple(sorted(kept))
            if len(kept) < self.blocks[layer].experts.num_experts:
                self._restricted(layer, kept)  # fails now, with the routing rule's reason, if the rule forbids it
                current[layer] = kept
        self._current = current

    def _restricted(self, layer: int, kept: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
        key = (layer, kept)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        block = self.blocks[layer]
        overrides = self.family.routing_overrides(self.config, layer, kept)
        restricted = restricted_router(block, self.family, kept, overrides)
        device = next(iter(router_of(block, self.family).parameters())).device
        self._cache[key] = (restricted, torch.tensor(kept, dtype=torch.long, device=device))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return self._cache[key]

    def _hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def on_router(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            kept = self._current.get(layer)
            if kept is None:
                return output
            restricted, ids = self._restricted(layer, kept)
            _, weights, positions = restricted(args[0])
            logits = output[0]
            excluded = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
            excluded[ids] = False
            return logits.masked_fill(excluded, float("-inf")), weights, ids[positions]

        return on_router

    def __enter__(self) -> RouterMasks:
        if self._handles:
            raise RuntimeError("router masks are installed already")
        self._handles = [
            router_of(block, self.family).register_forward_hook(self._hook(layer))
            for layer, block in self.blocks.items()
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
