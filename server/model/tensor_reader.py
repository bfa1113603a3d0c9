"""A checkpoint's tensors under the model's own names, read as owning copies on the target device and dtype.

The module tree and the checkpoint may name a tensor differently (Mixtral's `block_sparse_moe`), and store
experts fused ([E, ...] tensors) or one by one; the family's adapter says how. Reads go through the
`CheckpointReader`, which counts every byte: what is not asked for is not read. The backbone (every tensor
but the routed experts, their router rows and the pruned MLP channels) is read once and shared by every model
built from it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from server.model.checkpoint import CheckpointError, CheckpointReader, contiguous_runs
from server.model.families import Family
from server.model.layout import SparseLayer


class TensorReader:
    """Reads one checkpoint's tensors by module name onto one device, in one dtype."""

    def __init__(
        self, checkpoint: CheckpointReader, family: Family, device: torch.device, dtype: torch.dtype, hidden: int
    ) -> None:
        self.checkpoint = checkpoint
        self.family = family
        self.device = device
        self.dtype = dtype
        self.hidden = hidden

    # -- names ---------------------------------------------------------------------------------

    def checkpoint_name(self, module_name: str) -> str | None:
        """The checkpoint's name of the tensor the module tree calls `module_name`, None if it holds none."""
        for candidate in self.family.checkpoint_candidates(module_name):
            if candidate in self.checkpoint:
                return candidate
        return None

    def required_name(self, module_name: str) -> str:
        name = self.checkpoint_name(module_name)
        if name is None:
            raise CheckpointError(f"{self.checkpoint.directory}: the checkpoint has no tensor for {module_name}")
        return name

    def fused_expert_names(self, layer: SparseLayer) -> tuple[str, str] | None:
        """Checkpoint names of a layer's fused `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], if fused."""
        gate_up = self.checkpoint_name(f"{layer.prefix}.experts.gate_up_proj")
        down = self.checkpoint_name(f"{layer.prefix}.experts.down_proj")
        return (gate_up, down) if gate_up and down else None

    def expert_names(self, layer: SparseLayer, expert: int) -> list[str]:
        """Checkpoint names of one expert's gate, up and down tensors, when stored per expert."""
        for prefix in self.family.checkpoint_candidates(f"{layer.prefix}.experts"):
            names = [f"{prefix}.{expert}.{projection}.weight" for projection in self.family.expert_projections]
            if all(n in self.checkpoint for n in names):
                return names
        raise CheckpointError(f"{self.checkpoint.directory}: no tensors for expert {expert} of {layer.prefix}")

    # -- reading -------------------------------------------------------------------------------

    def to_target(self, tensor: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        """An owning copy on the target device (and, for floating point unless `keep_dtype`, the target dtype).
        safetensors may hand out tensors that point into the file's mmap; a model must not (a rewritten file
        would change or crash it)."""
        dtype = self.dtype if tensor.is_floating_point() and not keep_dtype else tensor.dtype
        out = tensor.to(device=self.device, dtype=dtype)
        return out.clone() if out.data_ptr() == tensor.data_ptr() else out

    def stored(self, module_name: str) -> torch.Tensor:
        """The tensor as the checkpoint stores it (possibly a view of the file's mmap): for reading, not keeping."""
        return self.checkpoint.read(self.required_name(module_name))

    def read(self, module_name: str) -> torch.Tensor:
        """The whole tensor, on the target device and dtype."""
        return self.to_target(self.stored(module_name))

    def read_indices(
        self, module_name: str, indices: Sequence[int], dim: int = 0, keep_dtype: bool = False
    ) -> torch.Tensor:
        """The rows (dim 0) or columns (dim 1) `indices` of a tensor, reading only those."""
        selected = self.checkpoint.read_indices(self.required_name(module_name), indices, dim)
        return self.to_target(selected, keep_dtype)

    def read_experts(self, layer: SparseLayer, kept: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused `gate_up_proj` [K, 2I, H] and `down_proj` [K, H, I] of the kept experts, in `kept` order,
        written straight into the preallocated results: the transient cost is one expert's tensor."""
        fused = self.fused_expert_names(layer)
        if fused is not None:
            return self._read_fused(fused[0], kept), self._read_fused(fused[1], kept)
        size = layer.intermediate
        gate_up = torch.empty((len(kept), 2 * size, self.hidden), dtype=self.dtype, device=self.device)
        down = torch.empty((len(kept), self.hidden, size), dtype=self.dtype, device=self.device)
        for slot, expert in enumerate(kept):
            gate, up, down_name = self.expert_names(layer, expert)
            gate_up[slot, :size].copy_(self.checkpoint.read(gate))
            gate_up[slot, size:].copy_(self.checkpoint.read(up))
            down[slot].copy_(self.checkpoint.read(down_name))
        return gate_up, down

    def read_expert_tensor(self, layer: SparseLayer, name: str, kept: Sequence[int]) -> torch.Tensor:
        """One more per-expert tensor of the experts module (gpt-oss's `gate_up_proj_bias` [E, 2I]), stored
        fused: the kept experts' slices, in `kept` order."""
        return self._read_fused(self.required_name(f"{layer.prefix}.experts.{name}"), kept)

    def _read_fused(self, name: str, kept: Sequence[int]) -> torch.Tensor:
        """Kept experts of a fused [E, ...] checkpoint tensor, each run of consecutive experts copied once."""
        shape = self.checkpoint.info(name).shape
        out = torch.empty((len(kept), *shape[1:]), dtype=self.dtype, device=self.device)
        slot = 0
        for start, stop in contiguous_runs(kept):
            out[slot : slot + stop - start].copy_(self.checkpoint.read_rows(name, start, stop))
            slot += stop - start
        return out


class Backbone:
    """The backbone tensors read so far: each is read from disk the first time a model needs it, and the same
    tensor is handed to every model afterwards. Thread-safe."""

    def __init__(self, tensors: TensorReader) -> None:
        self.tensors = tensors
        self._read: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def tensor(self, module_name: str) -> torch.Tensor:
        with self._lock:
            tensor = self._read.get(module_name)
            if tensor is None:
                tensor = self._read[module_name] = self.tensors.read(module_name)
            return tensor

    @property
    def nbytes(self) -> int:
        """Bytes of the backbone tensors read so far (shared by every model)."""
        with self._lock:
            return sum(t.untyped_storage().nbytes() for t in self._read.values())
