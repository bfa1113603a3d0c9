"""Expert slots in the checkpoint's precision: FP8 or MXFP4 bytes plus their scales, dequantized per pass.

An expert pool that dequantizes at load holds every resident expert in the model's dtype: twice the bytes of
an FP8 checkpoint's expert for bf16. With `--expert-dtype auto` the slots of a block-FP8 checkpoint keep its
FP8 values and its per-block scales as they are stored, copied from the file without conversion, and each
forward pass dequantizes (DeepSeek's formula, `server.model.quantization`) only the slots its rows chose,
into a transient tensor of the model's dtype that the family's own experts code then runs on. So a slot
costs its FP8 bytes plus its scales, and a step pays for dequantizing the experts it uses.

Gate and up are stored apart in published checkpoints, each with its own grid of scales; a slot keeps both
grids one after the other (`parts`), so that partial edge blocks stay exactly where the checkpoint has them.
gpt-oss stores its experts fused as MXFP4 (4-bit values, a power-of-two scale per 32): its slots keep those
bytes, a quarter of bf16's, and its expert biases stay in the model's dtype beside them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from server.model.checkpoint import CheckpointError, CheckpointReader
from server.model.layout import SparseLayer
from server.model.quantization import QuantizedTensor, dequantize_fp8_blocks, dequantize_mxfp4
from server.model.slot_loader import paired_runs
from server.model.tensor_reader import TensorReader

#: experts dequantized at once in a forward pass: bounds the float32 intermediate of the formulas
DEQUANTIZE_EXPERTS = 8


class ExpertDtypeError(ValueError):
    """An `--expert-dtype` that this checkpoint or model cannot have (its message says what it can)."""


#: what `--expert-dtype` accepts besides a dtype name
AUTO, FP8, MXFP4 = "auto", "fp8", "mxfp4"
CopyInto = Callable[[torch.Tensor, torch.Tensor], None]


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


@dataclass(frozen=True)
class Fp8Experts:
    """A checkpoint's routed experts stored as block-FP8, one tensor per projection and expert: the block size
    and the scales' dtype."""

    block: tuple[int, int]
    scale_dtype: torch.dtype
    name = FP8

    def slot_tensors(self, tensors: TensorReader, layer: SparseLayer, count: int) -> dict[str, Fp8SlotTensor]:
        """`gate_up_proj` [S, 2I, H] (gate and up, each with its own grid) and `down_proj` [S, H, I]."""
        size, hidden, device = layer.intermediate, tensors.hidden, tensors.device
        return {
            "gate_up_proj": Fp8SlotTensor(count, (size, size), hidden, self, device),
            "down_proj": Fp8SlotTensor(count, (hidden,), size, self, device),
        }

    def expert_bytes(self, tensors: TensorReader, layer: SparseLayer) -> int:
        """Bytes of one expert's FP8 values and scales, computed without allocating."""
        size, hidden, (b0, b1) = layer.intermediate, tensors.hidden, self.block
        item = torch.empty((), dtype=self.scale_dtype).element_size()
        grid = 2 * _blocks(size, b0) * _blocks(hidden, b1) + _blocks(hidden, b0) * _blocks(size, b1)
        return 3 * size * hidden + grid * item

    def load(
        self,
        tensors: TensorReader,
        layer: SparseLayer,
        experts: Sequence[int],
        slots: Sequence[int],
        module: Any,
        copy_into: CopyInto,
    ) -> None:
        """Copy each expert's FP8 values and scales from the checkpoint's memory map into its slot, unconverted."""
        checkpoint = tensors.checkpoint
        for expert, slot in zip(experts, slots, strict=True):
            gate, up, down = tensors.expert_names(layer, expert)
            for target, part, name in (("gate_up_proj", 0, gate), ("gate_up_proj", 1, up), ("down_proj", 0, down)):
                scale = scale_name(checkpoint, name)
                values = checkpoint.rows_view(name, 0, checkpoint.info(name).shape[0])
                scales = checkpoint.rows_view(scale, 0, checkpoint.info(scale).shape[0])
                module.slot_tensors[target].load(slot, part, values, scales, copy_into)


@dataclass(frozen=True)
class Mxfp4Experts:
    """A checkpoint's routed experts stored fused as MXFP4 (gpt-oss): `*_blocks` [E, rows, G, 16] and `*_scales`
    [E, rows, G], in the checkpoint's [out, in] orientation, which the module holds transposed."""

    name = MXFP4

    def slot_tensors(self, tensors: TensorReader, layer: SparseLayer, count: int) -> dict[str, Mxfp4SlotTensor]:
        return {
            tensor: Mxfp4SlotTensor(count, tensors.checkpoint.info(stored.data).shape[1:], stored, tensors.device)
            for tensor, stored in _stored_mxfp4(tensors, layer).items()
        }

    def expert_bytes(self, tensors: TensorReader, layer: SparseLayer) -> int:
        """Bytes of one expert's packed values and scales."""
        checkpoint = tensors.checkpoint
        return sum(
            (checkpoint.info(stored.data).nbytes + checkpoint.info(stored.scale).nbytes)
            // checkpoint.info(stored.data).shape[0]
            for stored in _stored_mxfp4(tensors, layer).values()
        )

    def load(
        self,
        tensors: TensorReader,
        layer: SparseLayer,
        experts: Sequence[int],
        slots: Sequence[int],
        module: Any,
        copy_into: CopyInto,
    ) -> None:
        """Copy runs of consecutive experts' blocks and scales into consecutive slots, unconverted."""
        checkpoint = tensors.checkpoint
        stored = _stored_mxfp4(tensors, layer)
        for first, count in paired_runs(experts, slots):
            expert, slot = experts[first], slots[first]
            for tensor, info in stored.items():
                target = module.slot_tensors[tensor]
                copy_into(target.blocks[slot : slot + count], checkpoint.rows_view(info.data, expert, expert + count))
                copy_into(target.scales[slot : slot + count], checkpoint.rows_view(info.scale, expert, expert + count))


def _stored_mxfp4(tensors: TensorReader, layer: SparseLayer) -> dict[str, QuantizedTensor]:
    found = {}
    for tensor in QUANTIZED_TENSORS:
        stored = tensors.checkpoint.quantized_info(tensors.required_name(f"{layer.prefix}.experts.{tensor}"))
        if stored is None or stored.format != MXFP4:
            raise CheckpointError(f"{tensors.checkpoint.directory}: {layer.prefix}.experts.{tensor} is not MXFP4")
        found[tensor] = stored
    return found


SlotFormat = Fp8Experts | Mxfp4Experts


#: the experts module's tensors that quantized slots hold (others, such as gpt-oss's biases, stay in the dtype)
QUANTIZED_TENSORS = ("gate_up_proj", "down_proj")


def checkpoint_experts_format(tensors: TensorReader, layers: Sequence[SparseLayer]) -> SlotFormat | None:
    """How the checkpoint stores its routed experts, if in a format slots can hold: block-FP8 e4m3 one tensor per
    projection and expert (FP8 releases), or fused MXFP4 (gpt-oss), the same in every sparse layer. None for
    plain floating point, and for quantized experts stored otherwise or differently from layer to layer (those
    pools dequantize their experts when loading them)."""
    formats = {_layer_format(tensors, layer) for layer in layers}
    return formats.pop() if len(formats) == 1 else None


def _layer_format(tensors: TensorReader, layer: SparseLayer) -> SlotFormat | None:
    family, checkpoint = tensors.family, tensors.checkpoint
    fused = tensors.fused_expert_names(layer)
    if fused is not None:
        stored = [checkpoint.quantized_info(name) for name in fused]
        return Mxfp4Experts() if all(s is not None and s.format == MXFP4 for s in stored) else None
    if family.expert_tensors != QUANTIZED_TENSORS or family.experts_layout != "gate_up_rows":
        return None
    stored = [checkpoint.quantized_info(name) for name in tensors.expert_names(layer, 0)]
    first = stored[0]
    if first is None or first.format != "fp8_e4m3":
        return None
    if any(
        s is None or (s.format, s.block, s.scale_dtype) != (first.format, first.block, first.scale_dtype)
        for s in stored
    ):
        return None
    return Fp8Experts(first.block, first.scale_dtype)


def scale_name(checkpoint: CheckpointReader, name: str) -> str:
    """The scale grid stored beside the FP8 weight `name` (`...weight_scale_inv`)."""
    stored = checkpoint.quantized_info(name)
    if stored is None or stored.format != "fp8_e4m3":
        raise CheckpointError(f"{checkpoint.directory}: {name} is not stored as block-FP8 e4m3, as its layer's are")
    return stored.scale


def resolve_expert_format(requested: str, stored: SlotFormat | None, dtype: torch.dtype) -> SlotFormat | None:
    """The slots' format for `--expert-dtype requested`: the checkpoint's (`auto`, or its name: `fp8`, `mxfp4`),
    or None (the model's dtype: experts dequantized when copied in)."""
    dtype_name = str(dtype).removeprefix("torch.")
    stored_name = stored.name if stored is not None else None
    if requested in (AUTO, stored_name):
        return stored
    if requested in (FP8, MXFP4):
        have = f"stores them as {stored_name}" if stored is not None else "stores its experts unquantized"
        raise ExpertDtypeError(
            f"--expert-dtype {requested} needs a checkpoint whose experts are {requested}; this one {have}"
        )
    if requested == dtype_name:
        return None
    raise ExpertDtypeError(
        f"--expert-dtype {requested!r}: slots hold the checkpoint's precision (auto, fp8, mxfp4) or the model's "
        f"dtype ({dtype_name}, set by --dtype)"
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
        """[len(slots), R, C] in `dtype`: the chosen slots only, each part by its own grid, written into one
        output a few experts at a time (the formula's float32 intermediate stays that small)."""
        out = torch.empty((len(slots), *self.values.shape[1:]), dtype=dtype, device=self.values.device)
        for start in range(0, len(slots), DEQUANTIZE_EXPERTS):
            chosen = slots[start : start + DEQUANTIZE_EXPERTS]
            values, scales = self.values.index_select(0, chosen), self.scales.index_select(0, chosen)
            row, grid = 0, 0
            for rows, grids in zip(self.parts, self.grids, strict=True):
                out[start : start + len(chosen), row : row + rows] = dequantize_fp8_blocks(
                    values[:, row : row + rows], scales[:, grid : grid + grids], self.block, dtype=dtype
                )
                row, grid = row + rows, grid + grids
        return out


class Mxfp4SlotTensor:
    """Slots of one fused expert tensor in MXFP4: packed values [S, rows, G, 16] and scales [S, rows, G]."""

    def __init__(self, slots: int, shape: Sequence[int], stored: QuantizedTensor, device: torch.device) -> None:
        self.transposed = stored.transposed
        self.blocks = torch.zeros((slots, *shape), dtype=torch.uint8, device=device)
        self.scales = torch.zeros((slots, *shape[:-1]), dtype=torch.uint8, device=device)

    @property
    def slot_bytes(self) -> int:
        return self.blocks[0].numel() + self.scales[0].numel()

    def dequantize(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[len(slots), ...] in `dtype`, in the module's layout, a few experts at a time (as FP8's)."""
        shape = (*self.blocks.shape[1:-2], self.blocks.shape[-2] * 32)
        out = torch.empty((len(slots), *shape), dtype=dtype, device=self.blocks.device)
        for start in range(0, len(slots), DEQUANTIZE_EXPERTS):
            chosen = slots[start : start + DEQUANTIZE_EXPERTS]
            out[start : start + len(chosen)] = dequantize_mxfp4(
                self.blocks.index_select(0, chosen), self.scales.index_select(0, chosen), dtype=dtype
            )
        return out.transpose(-1, -2) if self.transposed else out


class DequantizingExperts(nn.Module):
    """A pooled layer's experts whose slots hold quantized bytes: each call dequantizes the slots its rows chose,
    takes the same slots of the experts' other tensors (gpt-oss's biases, held in the model's dtype), and runs
    the family's own experts code on just those (their positions in place of slot numbers)."""

    def __init__(
        self,
        experts: nn.Module,
        slots: Mapping[str, Fp8SlotTensor | Mxfp4SlotTensor],
        others: Sequence[str],
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "inner", experts)  # not a child: its quantized tensors are placeholders
        self.slot_tensors = dict(slots)
        self.others = tuple(others)
        self.dtype = dtype
        self.num_experts = int(experts.num_experts)

    def forward(self, hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, *args: Any) -> torch.Tensor:
        used, positions = torch.unique(slots, return_inverse=True)
        step = copy.copy(self.inner)  # a shallow copy per call: concurrent passes never share tensors
        step._parameters = dict(self.inner._parameters)
        for name, tensor in self.slot_tensors.items():
            step._parameters[name] = tensor.dequantize(used, self.dtype)
        for name in self.others:
            step._parameters[name] = self.inner._parameters[name].index_select(0, used)
        step.num_experts = int(used.numel())
        return type(self.inner).forward(step, hidden, positions.view_as(slots), weights, *args)

    def other_tensor(self, name: str) -> torch.Tensor:
        """The slots [S, ...] of one of the experts' tensors held in the model's dtype."""
        return self.inner._parameters[name].data


def quantized_experts(
    experts: nn.Module, fmt: SlotFormat, tensors: TensorReader, layer: SparseLayer, count: int
) -> DequantizingExperts:
    """`experts` (whose quantized tensors are placeholders, its other tensors `count` slots each) with `count`
    slots in `fmt` for the quantized ones."""
    slots = fmt.slot_tensors(tensors, layer, count)
    others = [name for name in tensors.family.expert_tensors if name not in slots]
    return DequantizingExperts(experts, slots, others, tensors.dtype)


def quantized_expert_bytes(fmt: SlotFormat, tensors: TensorReader, layer: SparseLayer) -> int:
    """Bytes of one slot: the quantized tensors as stored, the others (biases) in the model's dtype."""
    item = torch.empty((), dtype=tensors.dtype).element_size()
    others = sum(math.prod(shape) for name, shape in layer.expert_shapes.items() if name not in QUANTIZED_TENSORS)
    return fmt.expert_bytes(tensors, layer) + others * item


def load_quantized(
    tensors: TensorReader,
    layer: SparseLayer,
    experts: Sequence[int],
    slots: Sequence[int],
    module: DequantizingExperts,
    fmt: SlotFormat,
    copy_into: CopyInto,
) -> None:
    """Copy `experts[i]` into slot `slots[i]`: the quantized tensors as stored, the others converted."""
    fmt.load(tensors, layer, experts, slots, module, copy_into)
    checkpoint = tensors.checkpoint
    for name in module.others:
        stored = tensors.required_name(f"{layer.prefix}.experts.{name}")
        target = module.other_tensor(name)
        for first, count in paired_runs(experts, slots):
            expert, slot = experts[first], slots[first]
            copy_into(target[slot : slot + count], checkpoint.rows_view(stored, expert, expert + count))
