"""Novices: what a pruned expert's choice gets when the router may still choose it (MoNE, ICLR 2026).

A pattern with novices keeps its routers whole: every token goes to the experts the full router chooses, with
the full router's gate weights. A chosen kept expert runs; a chosen pruned expert j adds g_j(x) * f_j(x)
instead, its novice: the mean of E_j(x) over the calibration tokens the full router sent to it
(`ExpertStatistics.novices`), f_j(x) = n_j, or with a low-rank novice also a rank-r linear map of the token,
f_j(x) = n_j + ((x - m_j) U_j) V_j^T (`pattern_store.substitutes`). A pruned expert then costs one vector (or
2 r + 2) of the hidden size, not a slot, and the router's choice, which the pruning would otherwise redirect to
a kept expert, is left as the model was trained to make it.

Three places run it, each through one `NoviceTable` (its `term`):
- `NoviceExperts`: a built variant's experts module (its kept experts, and a table of novices);
- `NoviceMasks`: hooks that make a model holding every expert answer as a selection with novices would (the
  refinements score candidates this way);
- the expert pool (`pooled`), per row of a mixed batch (`batch_term`: each route's own table over its rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pattern_store.substitutes import LowRankMaps


@dataclass(frozen=True)
class NoviceTable:
    """Novices by row: `novices` [N, H], and the low-rank maps [N, H, r] when the novices are low-rank. `term`
    takes a layer's expert ids, which `row_of` maps to rows; without it an expert's id is its row (a table of
    every expert, as calibration makes). A pattern's table holds only its pruned experts' rows (`of_pruned`):
    at DeepSeek-V3's size a low-rank row is 0.5 MB, and a table of every expert would spend that on the kept
    ones too."""

    novices: torch.Tensor
    low_rank: LowRankMaps | None = None
    #: [E] bool, a layer's table of one pattern (`of_pruned`): the experts its novices stand in for
    substituted: torch.Tensor | None = None
    #: [E] int64: each expert's row (a kept expert's points at any row: `term` weighs it zero)
    row_of: torch.Tensor | None = None

    @classmethod
    def of_pruned(
        cls, novices: torch.Tensor, kept: Sequence[int], num_experts: int, low_rank: LowRankMaps | None = None
    ) -> NoviceTable:
        """The table of one layer from its pruned experts' rows (`novices` [E - K, H], `low_rank` [E - K, ...],
        in ascending expert id): those rows, and each pruned expert's index pointing at its own."""
        pruned = pruned_experts(kept, num_experts)
        if novices.shape[0] != len(pruned):
            raise ValueError(f"{novices.shape[0]} novices for {len(pruned)} pruned experts")
        if not pruned:
            raise ValueError("a layer that keeps every expert has no novices")
        row_of = torch.zeros(num_experts, dtype=torch.long, device=novices.device)
        row_of[pruned] = torch.arange(len(pruned), device=novices.device)
        return cls(novices, low_rank, substituted_mask(kept, num_experts, novices.device), row_of)

    def pruned_part(self, kept: Sequence[int]) -> NoviceTable:
        """The rows of the experts outside `kept`, in ascending id (what a pattern stores)."""
        pruned = pruned_experts(kept, self.width)
        if self.substituted is not None and not bool(self.substituted[pruned].all()):
            raise ValueError("the table has no novice for some of the experts outside kept")
        rows = pruned if self.row_of is None else self.row_of[pruned].tolist()
        return NoviceTable(self.novices[rows], None if self.low_rank is None else self.low_rank.rows(rows))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> NoviceTable:
        return NoviceTable(
            self.novices.to(device, dtype),
            None if self.low_rank is None else self.low_rank.to(device, dtype),
            None if self.substituted is None else self.substituted.to(device),
            None if self.row_of is None else self.row_of.to(device),
        )

    @property
    def rows(self) -> int:
        return int(self.novices.shape[0])

    @property
    def width(self) -> int:
        """The layer's experts: the ids `term` takes."""
        return self.rows if self.row_of is None else int(self.row_of.shape[0])

    @property
    def nbytes(self) -> int:
        """What the table holds on its device."""
        parts = [self.novices, self.substituted, self.row_of, *(_parts(self.low_rank) if self.low_rank else ())]
        return sum(part.numel() * part.element_size() for part in parts if part is not None)

    def term(
        self, hidden: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, substituted: torch.Tensor
    ) -> torch.Tensor:
        """[T, H]: over each token's chosen experts a novice answers (`substituted` [T, k]), gate weight (`weights`
        [T, k]) x the novice of expert `index` [T, k], for the tokens `hidden` [T, H]. The constant
        part is one matrix product (weights scattered into [T, N]); the low-rank part runs per row chosen."""
        if self.row_of is not None:
            index = self.row_of[index]
        chosen = weights.masked_fill(~substituted, 0.0).to(self.novices.dtype)
        dense = torch.zeros((index.shape[0], self.rows), dtype=self.novices.dtype, device=self.novices.device)
        out = dense.scatter_add_(1, index, chosen) @ self.novices
        if self.low_rank is None:
            return out
        maps = self.low_rank
        for row in index[substituted].unique().tolist():
            tokens, slot = ((index == row) & substituted).nonzero(as_tuple=True)
            x = hidden[tokens].to(maps.means.dtype) - maps.means[row]
            out.index_add_(0, tokens, chosen[tokens, slot, None] * ((x @ maps.inputs[row]) @ maps.outputs[row].T))
        return out

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, E, H]: every expert's novice for every token (what the layer-local refinement compares; with
        `row_of`, a kept expert's entry is some pruned expert's novice, never weighed)."""
        out = self.novices.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        if self.low_rank is not None:
            maps = self.low_rank
            x = hidden.to(maps.means.dtype).unsqueeze(1) - maps.means.unsqueeze(0)  # [T, N, H]
            inner = torch.einsum("tnh,nhr->tnr", x, maps.inputs)
            out = out + torch.einsum("tnr,nhr->tnh", inner, maps.outputs)
        return out if self.row_of is None else out[:, self.row_of]


def _parts(maps: LowRankMaps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return maps.means, maps.inputs, maps.outputs


def pruned_experts(kept: Sequence[int], num_experts: int) -> list[int]:
    """The experts of a layer of `num_experts` that `kept` leaves out, in ascending id."""
    keep = set(kept)
    return [e for e in range(num_experts) if e not in keep]


def pruned_rows(table: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """The rows of a per-expert tensor ([E, ...]) for the pruned experts, in ascending id."""
    return table[pruned_experts(kept, table.shape[0])]


def batch_term(
    tables: Sequence[NoviceTable],
    tokens_of_table: Sequence[torch.Tensor] | None,
    hidden: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    substituted: torch.Tensor,
) -> torch.Tensor:
    """`NoviceTable.term` for a batch whose tokens follow different tables: `tokens_of_table[i]` the tokens that
    read table i (the others' term is zero; None: every token reads the only table). The token lists come from
    the host (`BatchMasks.novices`), so the decode step does not wait on the device to split its tokens. One
    term per table over its own tokens, added in place: no table is copied to stack them (at DeepSeek-V3's size
    a low-rank pattern's tables are GBs)."""
    if tokens_of_table is None:
        return tables[0].term(hidden, weights, index, substituted)
    out = torch.zeros(hidden.shape, dtype=tables[0].novices.dtype, device=hidden.device)
    for table, tokens in zip(tables, tokens_of_table, strict=True):
        out.index_add_(0, tokens, table.term(hidden[tokens], weights[tokens], index[tokens], substituted[tokens]))
    return out


def substituted_mask(kept: Sequence[int], num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """[E] bool: True for the experts a novice stands in for."""
    mask = torch.ones(num_experts, dtype=torch.bool, device=device)
    mask[list(kept)] = False
    return mask


def novice_tables(
    novices: Mapping[int, torch.Tensor],
    low_rank: Mapping[int, LowRankMaps],
    kept: Mapping[int, Sequence[int]],
    num_experts: Mapping[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, NoviceTable]:
    """Per layer with novices that prunes (`kept`: those layers' kept experts), its table on `device` in `dtype`
    (what a variant or a row of the pool reads), from a selection's pruned rows."""
    return {
        layer: NoviceTable.of_pruned(rows, kept[layer], num_experts[layer], low_rank.get(layer)).to(device, dtype)
        for layer, rows in novices.items()
        if layer in kept  # a layer that keeps every expert (its novices, if named, are empty) routes as it is
    }


class NoviceExperts(nn.Module):
    """A variant's experts module with novices: the kept experts (positions 0..K-1 of `experts`) and the
    novices of the others. Called, as the block calls its experts, with the full router's choices (expert ids)
    and gate weights: a kept choice runs its expert, a pruned one adds its novice."""

    def __init__(self, experts: nn.Module, kept: Sequence[int], table: NoviceTable) -> None:
        super().__init__()
        self.experts = experts
        num_experts = table.width
        device = table.novices.device
        position = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        position[list(kept)] = torch.arange(len(kept), device=device)
        self.register_buffer("position", position, persistent=False)
        # the table's tensors as buffers: they move with the model, and count as what the variant holds
        self.register_buffer("novices", table.novices, persistent=False)
        self.register_buffer("row_of", table.row_of, persistent=False)
        for part in ("means", "inputs", "outputs"):
            value = getattr(table.low_rank, part) if table.low_rank is not None else None
            self.register_buffer(part, value, persistent=False)
        self.num_experts = num_experts

    @property
    def table(self) -> NoviceTable:
        low_rank = LowRankMaps(self.means, self.inputs, self.outputs) if self.means is not None else None
        return NoviceTable(self.novices, low_rank, row_of=self.row_of)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Any:
        position = self.position[top_k_index]
        substituted = position < 0
        # a substituted choice runs a kept expert at weight 0 (every family's experts code takes any index)
        routed = self.experts(hidden_states, position.clamp_min(0), top_k_weights.masked_fill(substituted, 0.0))
        term = self.table.term(hidden_states, top_k_weights, top_k_index, substituted)
        return routed + term.to(routed.dtype)


class NoviceMasks:
    """Hooks on a model holding every expert that make its named layers answer as a selection with novices:
    `masks.apply({layer: kept, ...})`, then inside `with masks:` each chosen pruned expert's output is replaced
    by its novice (the router chooses as the full model's does). The same interface as `masking.RouterMasks`,
    so the refinements score candidates with either."""

    def __init__(self, model: nn.Module, routers: Mapping[int, str], tables: Mapping[int, NoviceTable]) -> None:
        """`routers`: each sparse layer's MoE block name; `tables`: each layer's novices of every expert."""
        self.experts = {index: model.get_submodule(prefix).experts for index, prefix in routers.items()}
        self.tables = dict(tables)
        self._current: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def apply(self, selection: Mapping[int, Sequence[int]]) -> None:
        """Substitute novices for the experts each named layer does not keep (layers not named keep all)."""
        current = {}
        for layer, kept in selection.items():
            if layer not in self.experts:
                raise KeyError(f"layer {layer} has no routed experts")
            table = self.tables[layer]
            if len(set(kept)) < table.width:
                current[layer] = substituted_mask(kept, table.width, table.novices.device)
        self._current = current

    def _before(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...]], Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            substituted = self._current.get(layer)
            if substituted is None:
                return None
            hidden, index, weights = args[0], args[1], args[2]
            chosen = substituted[index]
            self._pending[layer] = (hidden, weights, index, chosen)
            return (hidden, index, weights.masked_fill(chosen, 0.0), *args[3:])

        return hook

    def _after(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            pending = self._pending.pop(layer, None)
            if pending is None:
                return None
            return output + self.tables[layer].term(*pending).to(output.dtype)

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
