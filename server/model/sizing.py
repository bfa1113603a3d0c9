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
        """Bytes of one routed expert of sparse layer `layer` (its projections and any biases)."""
        return self.layout.sparse_layers[layer].expert_elements * self.item

    def variant_bytes(self, selection: Selection | None = None) -> int:
        """Bytes that building the variant of `selection` (the full model when None) allocates beyond the shared
        backbone: its experts and router rows or its MLP channels, and its computed buffers."""
        selection = self.layout.checked(selection)
        pruned = self._moe_bytes(selection) if self.layout.is_moe else self._dense_bytes(selection)
        return self.layout.computed_bytes + pruned

    def _moe_bytes(self, selection: Selection) -> int:
        total = 0
        family = self.layout.family
        for index, plan in self.layout.moe_plan(selection).items():
            layer = self.layout.sparse_layers[index]
            per_expert = layer.expert_elements * self.item
            for tensor in family.router_tensors:
                name = self.tensors.required_name(family.router_tensor_name(layer.prefix, tensor))
                info = self.tensors.checkpoint.info(name)
                # as stored (selection biases), or in the target dtype (router weights and biases)
                share = info.nbytes if tensor.keep_dtype else info.nbytes // info.element_size * self.item
                per_expert += share // max(1, info.shape[tensor.dim])
            if index in selection.novices and len(plan.kept) < layer.num_experts:  # the whole router, and a table
                # of the pruned experts' novices (and maps)
                total += (layer.num_experts - len(plan.kept)) * (per_expert - layer.expert_elements * self.item)
                total += self._novice_bytes(selection, index, layer.num_experts, len(plan.kept))
            total += len(plan.kept) * per_expert
        return total

    def _novice_bytes(self, selection: Selection, index: int, num_experts: int, kept: int) -> int:
        """A layer's `NoviceExperts` tables: the pruned experts' novices [E - K, H] (with low-rank maps: means
        [E - K, H], U and V [E - K, H, r]) in the target dtype, and two maps of [E] (int64): the expert's
        position among the kept, and its row in the table."""
        maps = selection.low_rank.get(index)
        vectors = 1 if maps is None else 2 + 2 * int(maps.inputs.shape[-1])
        return (num_experts - kept) * vectors * self.hidden * self.item + num_experts * (8 + 8)

    def _dense_bytes(self, selection: Selection) -> int:
        total = 0
        for index, kept in self.layout.dense_plan(selection).items():
            prefix = self.layout.dense_layers[index].prefix
            total += 3 * len(kept) * self.hidden * self.item
            for projection in ("gate_proj", "up_proj"):
                if self.tensors.checkpoint_name(f"{prefix}.{projection}.bias") is not None:
                    total += len(kept) * self.item
        return total + len(selection.bias) * self.hidden * self.item
