"""Copying experts from the checkpoint into the preallocated slots of a pooled model.

The bytes go straight from the checkpoint's memory map into the slot tensors: runs of consecutive experts
going to consecutive slots are one copy each, and nothing is materialised in between (but a quantized
checkpoint's experts, dequantized run by run on the way). Copies into GPU memory
pass through one reused pinned host buffer (pinned memory is costly to allocate, and a copy from pageable
memory is staged by the driver anyway).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from server.model.layout import SparseLayer
from server.model.tensor_reader import TensorReader


def paired_runs(experts: Sequence[int], slots: Sequence[int]) -> list[tuple[int, int]]:
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


class SlotLoader:
    """Copies experts of one checkpoint into slot tensors; thread-safe."""

    def __init__(self, tensors: TensorReader) -> None:
        self.tensors = tensors
        self._staging: torch.Tensor | None = None  # pinned host buffer for copies into GPU memory
        self._staging_lock = threading.Lock()

    def load(
        self, layer: SparseLayer, experts: Sequence[int], slots: Sequence[int], targets: Mapping[str, torch.Tensor]
    ) -> None:
        """Copy `experts[i]` into slot `slots[i]` of a pooled layer's slot tensors: `targets` maps each of the
        experts module's per-expert tensors (`gate_up_proj` [S, 2I, H], `down_proj` [S, H, I], any expert
        biases) to its slots."""
        checkpoint = self.tensors.checkpoint
        fused = self.tensors.fused_expert_names(layer)
        gate_up, down = targets["gate_up_proj"], targets["down_proj"]
        biases = [name for name in targets if name not in ("gate_up_proj", "down_proj")]  # always stored fused
        extras = {name: self.tensors.required_name(f"{layer.prefix}.experts.{name}") for name in biases}
        size = layer.intermediate
        for first, count in paired_runs(experts, slots):
            expert, slot = experts[first], slots[first]
            for name in biases:
                self._copy(
                    targets[name][slot : slot + count], checkpoint.rows_view(extras[name], expert, expert + count)
                )
            if fused is not None:
                self._copy(gate_up[slot : slot + count], checkpoint.rows_to_copy(fused[0], expert, expert + count))
                self._copy(down[slot : slot + count], checkpoint.rows_to_copy(fused[1], expert, expert + count))
                continue
            for offset in range(count):
                gate_name, up_name, down_name = self.tensors.expert_names(layer, expert + offset)
                target = slot + offset
                self._copy(gate_up[target, :size], checkpoint.rows_to_copy(gate_name, 0, size))
                self._copy(gate_up[target, size:], checkpoint.rows_to_copy(up_name, 0, size))
                self._copy(down[target], checkpoint.rows_to_copy(down_name, 0, checkpoint.info(down_name).shape[0]))

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """`target.copy_(source)`; into GPU memory through the pinned staging buffer."""
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
