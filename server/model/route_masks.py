"""Rows of one batch routed as different variants by the full router, in a constant number of operations.

A pruned variant's router scores only its kept experts; every family's routing rule (softmax over the
experts, top-k of logits, sparsemixer, sigmoid scores with a selection bias, group-limited top-k) gives the
same choices and gate weights when the full router runs with the pruned experts' logits at -inf and their
selection biases at -inf: a -inf logit weighs exp(-inf) = 0 in every softmax and sigmoid(-inf) = 0, and a -inf
score is never among the top k (a route keeps at least top-k experts; group-limited rules keep the same count
in every group, checked when the route is made). So a batch whose rows follow different patterns is routed
by one run of the family's own router code, whatever the number of patterns: each row's tokens get their
route's mask of pruned experts, one [rows, experts] boolean per sparse layer.

The masks enter the family's router without copying its code: while it runs, a `TorchFunctionMode` fills the
pruned logits of its one linear layer with -inf and hands it each selection bias already filled, for the
tokens of each row. The masks are tensors (`BatchMasks`), so a captured CUDA graph reads them like any input.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from server.model.layout import SparseLayer
from server.model.novices import NoviceTable

CACHED_ROUTES = 512
"""Routes whose mask tensors are kept (one [sparse layers, experts] boolean each)."""


class RouteMaskTable:
    """Each route's pruned experts as one boolean tensor [sparse layers, experts] (True: pruned), made once.
    By default the experts its router may not choose (`RowRoute.masked`: a layer with novices masks nothing);
    `every_kept`: the experts it does not keep (what live coverage measures, novices or not)."""

    def __init__(self, layers: Mapping[int, SparseLayer], device: torch.device, every_kept: bool = False) -> None:
        self.every_kept = every_kept
        self.position = {index: position for position, index in enumerate(sorted(layers))}
        self.width = max(layer.num_experts for layer in layers.values())
        self.counts = {index: layer.num_experts for index, layer in layers.items()}
        self.device = device
        # by the route's id, with a weak reference to it: the cache never keeps a replaced pattern's route (and its
        # novice tables) alive, and a dead route's reused id is never taken for it
        self._cache: OrderedDict[int, tuple[weakref.ref, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # every decoding thread shares the table

    def pruned(self, route: Any) -> torch.Tensor:
        """[sparse layers, experts]: True where `route` (a `RowRoute`) prunes the expert."""
        with self._lock:
            return self._pruned(route)

    def _pruned(self, route: Any) -> torch.Tensor:
        found = self._cache.get(id(route))
        if found is not None and found[0]() is route:
            self._cache.move_to_end(id(route))
            return found[1]
        mask = torch.zeros((len(self.position), self.width), dtype=torch.bool)
        for index, position in self.position.items():
            mask[position, self.counts[index] :] = True  # a narrower layer's columns past its experts
            kept = (route.kept if self.every_kept else route.masked).get(index)
            if kept is not None:
                mask[position, : self.counts[index]] = True
                mask[position, list(kept)] = False
        mask = mask.to(self.device)
        self._cache[id(route)] = (weakref.ref(route), mask)
        while len(self._cache) > CACHED_ROUTES:
            self._cache.popitem(last=False)
        return mask


class BatchMasks:
    """The pruned experts of every token of one forward pass, per sparse layer: the rows' route masks,
    gathered once per pass when first asked for. `single` is the route when every row shares one pruned
    route (a restricted router then does the same work over the kept experts alone); `per_row` is None when
    no row prunes anything (every router then runs as it is)."""

    def __init__(self, routes: Sequence[Any], table: RouteMaskTable) -> None:
        self.routes = list(routes)
        self.table = table
        distinct = {id(route): route for route in self.routes}
        #: the sparse layers some row prunes: the others' routers run as they are
        chosen_from = (lambda route: route.kept) if table.every_kept else (lambda route: route.masked)
        self.pruned_layers: set[int] = {layer for route in distinct.values() for layer in chosen_from(route)}
        self.pruning = bool(self.pruned_layers)
        #: the sparse layers where some row's pruned choices get novices
        self.novice_layers: set[int] = {layer for route in distinct.values() for layer in route.novices}
        self._novices: dict[tuple[int, int], NoviceRows] = {}
        self.single = next(iter(distinct.values())) if self.pruning and len(distinct) == 1 else None
        self._per_row: torch.Tensor | None = None
        self._tokens: dict[int, torch.Tensor] = {}

    @property
    def per_row(self) -> torch.Tensor | None:
        """[sparse layers, rows, experts], or None when no row prunes."""
        if self.pruning and self._per_row is None:
            distinct: dict[int, int] = {}
            masks: list[torch.Tensor] = []
            order = []
            for route in self.routes:
                if id(route) not in distinct:
                    distinct[id(route)] = len(masks)
                    masks.append(self.table.pruned(route))
                order.append(distinct[id(route)])
            stacked = torch.stack(masks)  # [distinct routes, layers, experts]
            index = torch.tensor(order, device=stacked.device)
            self._per_row = stacked.index_select(0, index).transpose(0, 1)
        return self._per_row

    def tokens(self, layer: int, count: int) -> torch.Tensor | None:
        """[count, experts] for sparse layer `layer`, the tokens being rows x sequence length, row-major; None
        when no row prunes that layer."""
        if layer not in self.pruned_layers:
            return None
        per_row = self.per_row
        found = self._tokens.get(count)
        if found is None:
            rows = len(self.routes)
            found = per_row.repeat_interleave(count // rows, dim=1) if count != rows else per_row
            self._tokens[count] = found
        return found[self.table.position[layer], :, : self.table.counts[layer]]

    def novices(self, layer: int, count: int) -> NoviceRows | None:
        """For sparse layer `layer` and `count` tokens (rows x sequence length, row-major), None when no row has
        novices there, else the rows' `NoviceRows`."""
        if layer not in self.novice_layers:
            return None
        key = (layer, count)
        if key not in self._novices:
            numbered: dict[int, int] = {}
            tables = []
            for route in self.routes:
                if layer in route.novices and id(route) not in numbered:
                    numbered[id(route)] = len(tables)
                    tables.append(route.novices[layer])
            device = tables[0].novices.device
            none = torch.zeros(self.table.counts[layer], dtype=torch.bool, device=device)  # the rows without
            substitutes = torch.stack([*(table.substituted for table in tables), none])
            rows = [numbered.get(id(route), len(tables)) for route in self.routes]
            per_row = count // len(self.routes)
            route_of_token = torch.tensor(rows, device=device).repeat_interleave(per_row)
            tokens = None
            if any(row != 0 for row in rows):
                grid = torch.arange(count).view(len(rows), per_row)
                tokens = [grid[[i for i, row in enumerate(rows) if row == n]].flatten().to(device)
                          for n in range(len(tables))]  # fmt: skip
            self._novices[key] = NoviceRows(route_of_token, substitutes, tables, tokens)
        return self._novices[key]


@dataclass(frozen=True)
class NoviceRows:
    """The novices of one sparse layer's tokens in a batch: the routes with novices there numbered 0..R-1."""

    route_of_token: torch.Tensor  # [tokens]: each token's route (R for the rows without novices)
    substitutes: torch.Tensor  # [R + 1, E] bool: which experts each route's novices stand in for (the last: none)
    tables: list[NoviceTable]  # the R routes' tables
    #: per route, its tokens (from the host: no device sync to split them); None when every token reads route 0
    tokens: list[torch.Tensor] | None


class MaskedRouting(TorchFunctionMode):
    """While a router runs: its linear layer's logits get -inf on each token's pruned experts, and each
    selection bias named in `biases` is replaced, wherever the router reads it, by a copy with -inf there."""

    def __init__(self, pruned: torch.Tensor, biases: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.pruned = pruned
        self.experts = pruned.shape[-1]
        self.replaced = {id(bias): (bias, _fill_pruned(bias, pruned)) for bias in biases}
        self.masked_logits = False

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.replaced:
            args = tuple(self._replace(value) for value in args)
        out = func(*args, **kwargs)
        if func is F.linear and not self.masked_logits and out.shape[-1] == self.experts:
            self.masked_logits = True
            out = out.masked_fill(self.pruned.reshape(out.shape), float("-inf"))
        return out

    def _replace(self, value: Any) -> Any:
        found = self.replaced.get(id(value)) if isinstance(value, torch.Tensor) else None
        return found[1] if found is not None and found[0] is value else value


def _fill_pruned(bias: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """A selection bias [experts] (or [1, experts]) as [tokens, experts], -inf on each token's pruned experts."""
    return torch.where(pruned, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device), bias)


def masked_arguments(arguments: Sequence[Any], pruned: torch.Tensor) -> list[Any]:
    """Per-expert tensors a block passes to its router (MiniMax-M2's selection bias), filled per token."""
    return [_fill_pruned(value, pruned) if isinstance(value, torch.Tensor) else value for value in arguments]
