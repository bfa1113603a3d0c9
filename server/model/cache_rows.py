"""Rows of a decoding cache selected, repeated and joined, whatever each layer keeps per sequence.

A batched decoder keeps one cache for all its rows. Full-attention layers keep keys and values that grow
with the sequence ([rows, heads, length, dim]): rows of different lengths share them by left padding.
Linear-attention layers keep fixed-size states per row (Qwen3-Next's conv and recurrent states, MiniMax's
lightning key-value products): rows join by stacking, and padding never reaches them (the model's forward
zeroes padded inputs before they touch the state). Every function here walks the same list of row tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin


@dataclass(frozen=True)
class RowTensor:
    """One tensor of a cache whose first dimension is the row: where it lives, and whether it has a sequence
    dimension (-2) that left padding extends."""

    owner: Any  # a cache layer (attribute `key`), or the dict or list holding it (item `key`)
    key: str | int
    tensor: torch.Tensor
    sequence: bool

    def replace(self, tensor: torch.Tensor) -> None:
        if isinstance(self.owner, (dict, list)):
            self.owner[self.key] = tensor
        else:
            setattr(self.owner, self.key, tensor)


def row_tensors(cache: Cache) -> list[RowTensor]:
    """Every tensor of `cache` that holds one entry per row, layer by layer."""
    found = []
    for layer in cache.layers:
        if isinstance(layer, DynamicLayer) and layer.is_initialized:
            found += [RowTensor(layer, "keys", layer.keys, True), RowTensor(layer, "values", layer.values, True)]
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for index in range(layer.number_of_states):
                if layer.is_conv_states_initialized[index]:
                    found.append(RowTensor(layer.conv_states, index, layer.conv_states[index], False))
                if layer.is_recurrent_states_initialized[index]:
                    found.append(RowTensor(layer.recurrent_states, index, layer.recurrent_states[index], False))
    states = getattr(cache, "linear_cache", None)  # MiniMax's lightning attention
    for index, state in enumerate(states or []):
        if isinstance(state, torch.Tensor):
            found.append(RowTensor(states, index, state, False))
    return found


def _each(cache: Cache, change: Callable[[RowTensor], torch.Tensor | None]) -> None:
    for row_tensor in row_tensors(cache):
        replaced = change(row_tensor)
        if replaced is not None:
            row_tensor.replace(replaced)


def select_rows(cache: Cache, index: torch.Tensor) -> None:
    """Keep rows `index` (in that order) of every layer."""
    _each(cache, lambda t: t.tensor.index_select(0, index.to(t.tensor.device)))


def repeat_rows(cache: Cache, times: int) -> None:
    """Each row `times` times in a row (the choices of one prompt)."""
    _each(cache, lambda t: t.tensor.repeat_interleave(times, dim=0))


def drop_columns(cache: Cache, first: int) -> None:
    """Drop the first `first` sequence positions of the key/value layers (padding for every row)."""
    _each(cache, lambda t: t.tensor[..., first:, :] if t.sequence else None)


def left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the sequence dimension (-2) of a [rows, heads, seq, dim] cache tensor on the left."""
    missing = length - tensor.shape[-2]
    if missing == 0:
        return tensor
    padding = tensor.new_zeros((*tensor.shape[:-2], missing, tensor.shape[-1]))
    return torch.cat([padding, tensor], dim=-2)


def join_rows(cache: Cache, joining: Cache, length: int) -> None:
    """Append the rows of `joining` to `cache`'s: key/value layers both left-padded to `length` positions,
    fixed-size states stacked."""
    ours, theirs = row_tensors(cache), row_tensors(joining)
    if [(t.key, t.sequence) for t in ours] != [(t.key, t.sequence) for t in theirs]:
        raise ValueError("the caches to join do not hold the same layers")
    for mine, other in zip(ours, theirs, strict=True):
        if mine.sequence:
            mine.replace(torch.cat([left_pad(mine.tensor, length), left_pad(other.tensor, length)]))
        else:
            mine.replace(torch.cat([mine.tensor, other.tensor]))
