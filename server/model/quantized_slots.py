"""Expert slots in the checkpoint's precision: block-FP8 bytes plus their scales, dequantized per forward pass.

An expert pool that dequantizes at load holds every resident expert in the model's dtype: twice the bytes of
an FP8 checkpoint's expert for bf16. With `--expert-dtype auto` the slots of a block-FP8 checkpoint keep its
FP8 values and its per-block scales as they are stored, copied from the file without conversion, and each
forward pass dequantizes (DeepSeek's formula, `server.model.quantization`) only the slots its rows chose,
into a transient tensor of the model's dtype that the family's own experts code then runs on. So a slot
costs its FP8 bytes plus its scales, and a step pays for dequantizing the experts it uses.

Gate and up are stored apart in published checkpoints, each with its own grid of scales; a slot keeps both
grids one after the other (`parts`), so that partial edge blocks stay exactly where the checkpoint has them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from server.model.checkpoint import CheckpointError, CheckpointReader
from server.model.layout import SparseLayer
from server.model.quantization import dequantize_fp8_blocks
from server.model.tensor_reader import TensorReader

#: what `--expert-dtype` accepts besides a dtype name
AUTO, FP8 = "auto", "fp8"


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


@dataclass(frozen=True)
class Fp8Experts:
    """A checkpoint's routed experts stored as block-FP8: the block size and the scales' dtype."""

    block: tuple[int, int]
    scale_dtype: torch.dtype


#: the experts module's tensors that FP8 slots hold (families with expert biases or other layouts: none)
FP8_TENSORS = ("gate_up_proj", "down_proj")


def checkpoint_experts_format(tensors: TensorReader, layers: Sequence[SparseLayer]) -> Fp8Experts | None:
    """How the checkpoint stores its routed experts: block-FP8 e4m3 (per-expert weights with their scale grids),
    or None for plain floating point and for experts that FP8 slots do not hold (fused tensors, expert biases,
    a transposed layout, MXFP4: those pools dequantize their experts when loading them)."""
    family = tensors.family
    if not layers or family.expert_tensors != FP8_TENSORS or family.experts_layout != "gate_up_rows":
        return None
    if tensors.fused_expert_names(layers[0]) is not None:
        return None
    stored = tensors.checkpoint.quantized_info(tensors.expert_names(layers[0], 0)[0])
    if stored is None or stored.format != "fp8_e4m3":
        return None
    return Fp8Experts(stored.block, stored.scale_dtype)


def scale_name(checkpoint: CheckpointReader, name: str) -> str:
    """The scale grid stored beside the FP8 weight `name` (`...weight_scale_inv`)."""
    stored = checkpoint.quantized_info(name)
    if stored is None or stored.format != "fp8_e4m3":
        raise CheckpointError(f"{checkpoint.directory}: {name} is not stored as block-FP8 e4m3, as its layer's are")
    return stored.scale


def resolve_expert_format(requested: str, stored: Fp8Experts | None, dtype: torch.dtype) -> Fp8Experts | None:
    """The slots' format for `--expert-dtype requested`: the checkpoint's FP8 (`auto` on an FP8 checkpoint, or
    `fp8`), or None (the model's dtype: experts dequantized when copied in)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if requested == AUTO:
        return stored
    if requested == FP8:
        if stored is None:
            raise ValueError("--expert-dtype fp8 needs a block-FP8 checkpoint; this one stores its experts unquantized")
        return stored
    if requested == dtype_name:
        return None
    raise ValueError(
        f"--expert-dtype {requested!r}: slots hold the checkpoint's precision (auto, fp8) or the model's dtype "
        f"({dtype_name}, set by --dtype)"
    )


class Fp8SlotTensor:
    """Slots of one expert tensor in block-FP8: values [S, R, C] and scales [S, grid rows, grid columns], the
    rows made of `parts` (row count each) that each have their own grid."""

    def __init__(self, slots: int, parts: Sequence[int], cols: int, fmt: Fp8Experts, device: torch.device) -> None:
        self.parts = tuple(parts)
        self.block = fmt.block
        self.grids = tuple(_blocks(rows, fmt.block[0]) for rows in self.parts)
        self.values = torch.zeros((slots, sum(self.parts), cols), dtype=torch.float8_e4m3fn, device=device)
        self.scales = torch.zeros(
            (slots, sum(self.grids), _blocks(cols, fmt.block[1])), dtype=fmt.scale_dtype, device=device
        )

    @property
    def slot_bytes(self) -> int:
        return (self.values[0].numel() * self.values.element_size()) + (
            self.scales[0].numel() * self.scales.element_size()
        )

    def load(
        self,
        slot: int,
        part: int,
        values: torch.Tensor,
        scales: torch.Tensor,
        copy_into: Callable[[torch.Tensor, torch.Tensor], None],
    ) -> None:
        """Copy one part's stored values and scale grid into `slot`, as stored (`copy_into(target, source)`)."""
        row, grid = sum(self.parts[:part]), sum(self.grids[:part])
        copy_into(self.values[slot, row : row + self.parts[part]], values)
        copy_into(self.scales[slot, grid : grid + self.grids[part]], scales)

    def dequantize(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[len(slots), R, C] in `dtype`: the chosen slots only, each part by its own grid."""
        values, scales = self.values.index_select(0, slots), self.scales.index_select(0, slots)
        pieces, row, grid = [], 0, 0
        for rows, grids in zip(self.parts, self.grids, strict=True):
            part = dequantize_fp8_blocks(
                values[:, row : row + rows], scales[:, grid : grid + grids], self.block, dtype=dtype
            )
            pieces.append(part)
            row, grid = row + rows, grid + grids
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


class DequantizingExperts(nn.Module):
    """A pooled layer's experts whose slots hold FP8: each call dequantizes the slots its rows chose, then runs
    the family's own experts code on just those (their positions in place of slot numbers)."""

    def __init__(self, experts: nn.Module, slots: Mapping[str, Fp8SlotTensor], dtype: torch.dtype) -> None:
        super().__init__()
        object.__setattr__(self, "inner", experts)  # not a child: its expert tensors are placeholders
        self.slot_tensors = dict(slots)
        self.dtype = dtype
        self.num_experts = int(next(iter(slots.values())).values.shape[0])

    def forward(self, hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, *args: Any) -> torch.Tensor:
        used, positions = torch.unique(slots, return_inverse=True)
        step = copy.copy(self.inner)  # a shallow copy per call: concurrent passes never share tensors
        step._parameters = dict(self.inner._parameters)
        for name, tensor in self.slot_tensors.items():
            step._parameters[name] = tensor.dequantize(used, self.dtype)
        step.num_experts = int(used.numel())
        return type(self.inner).forward(step, hidden, positions.view_as(slots), weights, *args)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: every expert tensor's FP8 values and scales."""
        return sum(tensor.slot_bytes for tensor in self.slot_tensors.values())


def fp8_slots(
    layer: SparseLayer, slots: int, hidden: int, fmt: Fp8Experts, device: torch.device
) -> dict[str, Fp8SlotTensor]:
    """The FP8 slot tensors of one layer: `gate_up_proj` [S, 2I, H] (gate and up, each with its own grid) and
    `down_proj` [S, H, I]."""
    size = layer.intermediate
    return {
        "gate_up_proj": Fp8SlotTensor(slots, (size, size), hidden, fmt, device),
        "down_proj": Fp8SlotTensor(slots, (hidden,), size, fmt, device),
    }


def fp8_expert_bytes(layer: SparseLayer, hidden: int, fmt: Fp8Experts) -> int:
    """Bytes of one FP8 slot of `layer` (values and scales), computed without allocating."""
    size, (b0, b1) = layer.intermediate, fmt.block
    item = torch.empty((), dtype=fmt.scale_dtype).element_size()
    grid = 2 * _blocks(size, b0) * _blocks(hidden, b1) + _blocks(hidden, b0) * _blocks(size, b1)
    return 3 * size * hidden + grid * item


def load_fp8_expert(
    tensors: TensorReader,
    layer: SparseLayer,
    expert: int,
    slot: int,
    slot_tensors: Mapping[str, Fp8SlotTensor],
    copy_into: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """Copy one expert's FP8 values and scales from the checkpoint's memory map into `slot`, unconverted."""
    checkpoint = tensors.checkpoint
    gate, up, down = tensors.expert_names(layer, expert)
    for target, part, name in (("gate_up_proj", 0, gate), ("gate_up_proj", 1, up), ("down_proj", 0, down)):
        scale = scale_name(checkpoint, name)
        values = checkpoint.rows_view(name, 0, checkpoint.info(name).shape[0])
        scales = checkpoint.rows_view(scale, 0, checkpoint.info(scale).shape[0])
        slot_tensors[target].load(slot, part, values, scales, copy_into)
