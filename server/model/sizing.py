"""What a variant or an expert costs in memory, computed from the layout and the checkpoint's index alone.

The variant cache admits (or refuses) a variant against its byte budget before building it, and the expert
pool sizes its slots, so these numbers must be what a build really allocates beyond the shared backbone
(tests compare them with built models), without reading a single tensor.
"""

from __future__ import annotations

import torch

from pattern_store.selection import Selection
from server.model.layout import ModelLayout
from server.model.tensor_reader import TensorReader


class VariantSizes:
    """Bytes of variants and experts of one model in the target dtype."""

    def __init__(self, layout: ModelLayout, tensors: TensorReader) -> None:
        self.layout = layout
        self.tensors = tensors
        self.item = torch.empty((), dtype=tensors.dtype).element_size()
        self.hidden = int(layout.config.hidden_size)

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert of sparse layer `layer` (its gate, up and down)."""
        return 3 * self.layout.sparse_layers[layer].intermediate * self.hidden * self.item

    def variant_bytes(self, selection: Selection | None = None) -> int:
        """Bytes that building the variant of `selection` (the full model when None) allocates beyond the shared
        backbone: its experts and router rows or its MLP channels, and its computed buffers."""
        selection = self.layout.checked(selection)
        pruned = self._moe_bytes(selection) if self.layout.is_moe else self._dense_bytes(selection)
        return self.layout.computed_bytes + pruned

    def _moe_bytes(self, selection: Selection) -> int:
        total = 0
        for index, plan in self.layout.moe_plan(selection).items():
            layer = self.layout.sparse_layers[index]
            total += len(plan.kept) * (3 * layer.intermediate * self.hidden + self.hidden) * self.item
            for attribute in self.layout.family.router_expert_buffers:
                name = self.tensors.required_name(f"{layer.prefix}.gate.{attribute}")
                info = self.tensors.checkpoint.info(name)
                total += len(plan.kept) * info.nbytes // max(1, info.shape[0])
        return total

    def _dense_bytes(self, selection: Selection) -> int:
        total = 0
        for index, kept in self.layout.dense_plan(selection).items():
            prefix = self.layout.dense_layers[index].prefix
            total += 3 * len(kept) * self.hidden * self.item
            for projection in ("gate_proj", "up_proj"):
                if self.tensors.checkpoint_name(f"{prefix}.{projection}.bias") is not None:
                    total += len(kept) * self.item
        return total + len(selection.bias) * self.hidden * self.item
