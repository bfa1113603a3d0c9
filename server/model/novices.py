"""Novices: what a pruned expert's choice gets when the router may still choose it (MoNE, ICLR 2026).

A pattern with novices keeps its routers whole: every token goes to the experts the full router chooses, with
the full router's gate weights. A chosen kept expert runs; a chosen pruned expert j adds g_j(x) * n_j instead,
its novice: the mean of E_j(x) over the calibration tokens the full router sent to it (`ExpertStatistics.novices`).
A pruned expert then costs one vector of the hidden size, not a slot, and the router's choice, which the
pruning would otherwise redirect to a kept expert, is left as the model was trained to make it.

Three places run it, each with the same `novice_term`:
- `NoviceExperts`: a built variant's experts module (its kept experts, and a table of novices);
- `NoviceMasks`: hooks that make a model holding every expert answer as a selection with novices would (the
  refinements score candidates this way);
- the expert pool (`pooled`), per row of a mixed batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def novice_table(novices: torch.Tensor, kept: Sequence[int], num_experts: int) -> torch.Tensor:
    """[E, H]: the novices of the pruned experts (`novices` [E - K, H], rows in ascending expert id) in their
    experts' rows, zeros in the kept experts' rows."""
    pruned = [e for e in range(num_experts) if e not in set(kept)]
    if novices.shape[0] != len(pruned):
        raise ValueError(f"{novices.shape[0]} novices for {len(pruned)} pruned experts")
    table = torch.zeros((num_experts, novices.shape[1]), dtype=novices.dtype, device=novices.device)
    table[pruned] = novices
    return table


def pruned_rows(table: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """The inverse of `novice_table`: the rows of the pruned experts, in ascending id."""
    keep = set(kept)
    return table[[e for e in range(table.shape[0]) if e not in keep]]


def substituted_mask(kept: Sequence[int], num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """[E] bool: True for the experts a novice stands in for."""
    mask = torch.ones(num_experts, dtype=torch.bool, device=device)
    mask[list(kept)] = False
    return mask


def novice_term(
    weights: torch.Tensor, index: torch.Tensor, substituted: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """[T, H]: sum over each token's chosen experts that a novice stands in for of gate weight x novice.

    `weights`, `index` [T, k]: the router's gate weights and chosen experts; `substituted` [T, k] marks the
    choices a novice answers; `table` [E, H] (or [R*E, H] with `index` offset by each token's route). The
    weights are scattered into [T, E] and multiplied by the table: one matrix product, no [T, k, H] tensor."""
    chosen = weights.masked_fill(~substituted, 0.0).to(table.dtype)
    dense = torch.zeros((index.shape[0], table.shape[0]), dtype=table.dtype, device=table.device)
    return dense.scatter_add_(1, index, chosen) @ table


def novice_tables(
    novices: Mapping[int, torch.Tensor],
    kept: Mapping[int, Sequence[int]],
    num_experts: Mapping[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, torch.Tensor]:
    """Per layer with novices, its `novice_table` on `device` in `dtype` (what a row of the pool reads)."""
    return {
        layer: novice_table(rows.to(device, dtype), kept[layer], num_experts[layer]) for layer, rows in novices.items()
    }


class NoviceExperts(nn.Module):
    """A variant's experts module with novices: the kept experts (positions 0..K-1 of `experts`) and the
    novices of the others. Called, as the block calls its experts, with the full router's choices (expert ids)
    and gate weights: a kept choice runs its expert, a pruned one adds its novice."""

    def __init__(self, experts: nn.Module, kept: Sequence[int], table: torch.Tensor) -> None:
        super().__init__()
        self.experts = experts
        num_experts = table.shape[0]
        position = torch.full((num_experts,), -1, dtype=torch.long, device=table.device)
        position[list(kept)] = torch.arange(len(kept), device=table.device)
        self.register_buffer("position", position, persistent=False)
        self.register_buffer("table", table, persistent=False)
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Any:
        position = self.position[top_k_index]
        substituted = position < 0
        # a substituted choice runs a kept expert at weight 0 (every family's experts code takes any index)
        routed = self.experts(hidden_states, position.clamp_min(0), top_k_weights.masked_fill(substituted, 0.0))
        term = novice_term(top_k_weights, top_k_index, substituted, self.table)
        return routed + term.to(routed.dtype)


class NoviceMasks:
    """Hooks on a model holding every expert that make its named layers answer as a selection with novices:
    `masks.apply({layer: kept, ...})`, then inside `with masks:` each chosen pruned expert's output is replaced
    by its novice (the router chooses as the full model's does). The same interface as `masking.RouterMasks`,
    so the refinements score candidates with either."""

    def __init__(self, model: nn.Module, routers: Mapping[int, str], tables: Mapping[int, torch.Tensor]) -> None:
        """`routers`: each sparse layer's MoE block name; `tables`: each layer's novices [E, H] (`novice_table`
        over no kept expert: every expert's novice)."""
        self.experts = {index: model.get_submodule(prefix).experts for index, prefix in routers.items()}
        self.tables = dict(tables)
        self._current: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def apply(self, selection: Mapping[int, Sequence[int]]) -> None:
        """Substitute novices for the experts each named layer does not keep (layers not named keep all)."""
        current = {}
        for layer, kept in selection.items():
            if layer not in self.experts:
                raise KeyError(f"layer {layer} has no routed experts")
            table = self.tables[layer]
            if len(set(kept)) < table.shape[0]:
                current[layer] = substituted_mask(kept, table.shape[0], table.device)
        self._current = current

    def _before(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...]], Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            substituted = self._current.get(layer)
            if substituted is None:
                return None
            hidden, index, weights = args[0], args[1], args[2]
            chosen = substituted[index]
            self._pending[layer] = (weights, index, chosen)
            return (hidden, index, weights.masked_fill(chosen, 0.0), *args[3:])

        return hook

    def _after(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            pending = self._pending.pop(layer, None)
            if pending is None:
                return None
            weights, index, chosen = pending
            return output + novice_term(weights, index, chosen, self.tables[layer]).to(output.dtype)

        return hook

    def __enter__(self) -> NoviceMasks:
        if self._handles:
            raise RuntimeError("novice masks are installed already")
        for layer, experts in self.experts.items():
            self._handles.append(experts.register_forward_pre_hook(self._before(layer)))
            self._handles.append(experts.register_forward_hook(self._after(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = {}
