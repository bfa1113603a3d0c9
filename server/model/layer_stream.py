"""Tokens carried through a model's decoder layers one layer at a time, and the layers read one at a time.

Calibration and layer-local refinement run their prompts as the PreMoe reference implementation does: the
batch's hidden states are carried from layer to layer (`LayerStream`), and each layer's weights are read from
the mmap'd checkpoint into a skeleton of the model, used and freed again (`LayerLoader`). Peak memory is one
layer plus the hidden states, so a model larger than memory can be calibrated. `StreamedLayers` puts the two
together: one iterator over the layers that both passes run their layer's work in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from server.model.layout import ModelLayout
from server.model.module_tree import compute_buffers, computed_buffer_names, meta_model, set_tensor, to_meta
from server.model.tensor_reader import TensorReader

Progress = Callable[[int], None]


@dataclass
class StreamBatch:
    """One right-padded batch of prompts as it travels through the decoder layers."""

    hidden: torch.Tensor  # [B, S, H], the input of the next layer
    layer_inputs: list[dict[str, Any]]  # per decoder layer: the keyword arguments the model's forward gives it
    real: torch.Tensor  # [B * S] bool: real tokens, not padding
    ids: torch.Tensor  # [B, S] token ids
    prompts: list[int]  # the index of each row's prompt in the stream's input
    answer: torch.Tensor | None = None  # [B * S] bool: the answers' tokens (None: not told where they begin)


class _Reached(Exception):
    """Raised by the last `_Recorder`: the layers' inputs are known, the model's forward stops there."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer in the model's own forward, and keeps what that forward hands it."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.last = last
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("a decoder layer called with positional arguments besides the hidden states")
        self.hidden, self.kwargs = hidden, kwargs
        if self.last:
            raise _Reached
        return hidden


def layer_inputs(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The embedded tokens and, per decoder layer, the keyword arguments (masks, rotary embeddings, positions)
    that the model's own forward hands that layer for this batch with no cache. Asking the forward itself keeps
    every family's rules exact: a mask per layer kind (full, sliding window, the 2D padding mask of linear
    attention), Qwen3.5's multimodal rotary positions. Only the embeddings and rotary module need weights.
    The decoder layers are swapped out for the call: `model` must be one that nothing else runs meanwhile
    (calibration's skeleton, refinement's own build)."""
    inner = model.model
    layers = inner.layers
    recorders = nn.ModuleList(_Recorder(index == len(layers) - 1) for index in range(len(layers)))
    inner.layers = recorders
    try:
        inner(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Reached:
        pass
    finally:
        inner.layers = layers
    if any(recorder.hidden is None for recorder in recorders):
        raise RuntimeError(f"{type(inner).__name__}.forward did not run every decoder layer")
    kwargs = [{k: v for k, v in r.kwargs.items() if k not in ("cache", "use_cache")} for r in recorders]
    return recorders[0].hidden, kwargs


def padded_batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Right-padded batches (input ids [B, S], mask of real tokens [B, S], the prompts' indices), longest
    first to waste little padding."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(token_ids[chunk[0]])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            sequence = token_ids[prompt]
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        batches.append((ids, mask, chunk))
    return batches


class LayerStream:
    """Calibration tokens carried through a model's decoder layers, one layer at a time.

    `model` may be a skeleton whose layers are read one by one (`LayerLoader`: calibration) or a whole model
    (refinement by answer loss). Observers read `current` to know which batch (and which of its tokens are
    real) the layer is processing.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        token_ids: Sequence[Sequence[int]],
        batch_size: int = 16,
        answer_starts: Sequence[int] | None = None,
    ) -> None:
        if answer_starts is not None and len(answer_starts) != len(token_ids):
            raise ValueError(f"{len(answer_starts)} answer starts for {len(token_ids)} prompts")
        if not token_ids or not all(token_ids):
            raise ValueError("calibration needs at least one non-empty prompt")
        self.model = model
        self.config = model.config
        inner = model.model
        device = inner.embed_tokens.weight.device
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.batches: list[StreamBatch] = []
        with torch.inference_mode():
            for ids, mask, prompts in padded_batches(token_ids, batch_size, pad_id):
                ids, mask = ids.to(device), mask.to(device)
                hidden, inputs = layer_inputs(model, ids, mask)
                real = mask.reshape(-1).bool()
                answer = None
                if answer_starts is not None:
                    starts = torch.tensor([answer_starts[p] for p in prompts], device=device)
                    columns = torch.arange(ids.shape[1], device=device)
                    answer = (columns[None, :] >= starts[:, None]).reshape(-1) & real
                self.batches.append(StreamBatch(hidden, inputs, real, ids, prompts, answer))
        self.current: StreamBatch = self.batches[0]

    @property
    def tokens(self) -> int:
        return int(sum(int(batch.real.sum()) for batch in self.batches))

    @torch.inference_mode()
    def forward(self, index: int, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder layer `index` run over every batch with `inputs` (one tensor per batch) as its input; the
        stream's own hidden states stay as they are."""
        layer = self.model.model.layers[index]
        outputs = []
        for batch, hidden in zip(self.batches, inputs, strict=True):
            self.current = batch
            outputs.append(layer(hidden, **batch.layer_inputs[index]))
        return outputs

    def run_layer(self, index: int, inputs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run decoder layer `index` over every batch (its inputs: the stream's, or `inputs`), return the
        outputs and make them the stream's."""
        outputs = self.forward(index, [batch.hidden for batch in self.batches] if inputs is None else inputs)
        for batch, output in zip(self.batches, outputs, strict=True):
            batch.hidden = output
        return outputs

    @torch.inference_mode()
    def run_from(self, index: int, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The final hidden states (after the model's last norm) when `inputs` enter layer `index`; the stream
        itself is left as it was."""
        outputs = list(inputs)
        for layer_index in range(index, self.config.num_hidden_layers):
            outputs = self.forward(layer_index, outputs)
        return [self.model.model.norm(hidden) for hidden in outputs]


class LayerLoader:
    """A skeleton of the model on the meta device (no memory), whose modules are read from the checkpoint one
    at a time and freed again. Reads bypass the shared backbone, so that freeing gives the memory back."""

    def __init__(self, layout: ModelLayout, tensors: TensorReader) -> None:
        self.layout = layout
        self.tensors = tensors
        self.model = meta_model(layout.config).eval()  # from_config builds in training mode (PhiMoE samples)
        self._computed = computed_buffer_names(self.model, lambda name: tensors.checkpoint_name(name) is not None)
        self._stored = sorted(
            {name for name, _ in self.model.named_parameters()}
            | {name for name, _ in self.model.named_buffers() if name not in self._computed}
        )
        self._sparse = {layer.prefix: layer for layer in layout.sparse_layers.values()}

    def load(self, prefix: str) -> None:
        """Read every tensor under `prefix` (every expert of a sparse layer) into the skeleton."""
        for name in self._stored:
            if not name.startswith(f"{prefix}."):
                continue
            block_prefix = name.rsplit(".experts.", 1)[0]
            if block_prefix in self._sparse and name.endswith(".experts.gate_up_proj"):
                layer = self._sparse[block_prefix]
                gate_up, down = self.tensors.read_experts(layer, range(layer.num_experts))
                set_tensor(self.model, name, gate_up)
                set_tensor(self.model, f"{block_prefix}.experts.down_proj", down)
            elif block_prefix in self._sparse and name.endswith(".experts.down_proj"):
                continue  # read with gate_up_proj
            elif name in self.layout.tied and self.tensors.checkpoint_name(name) is None:
                continue
            else:
                set_tensor(self.model, name, self.tensors.read(name))
        computed = [name for name in self._computed if name.startswith(f"{prefix}.")]
        compute_buffers(self.model, computed, self.tensors.device)

    def free(self, prefix: str) -> None:
        """Put every tensor under `prefix` back on the meta device, freeing its memory."""
        to_meta(self.model.get_submodule(prefix))


class StreamedLayers:
    """Prompts run through a checkpoint's decoder layers with one layer's weights in memory at a time.

    `for index in streamed.layers(): ...` reads layer `index`, lets the body run it (`streamed.stream.run_layer`,
    with whatever hooks the pass needs), then frees it and reports progress.
    """

    def __init__(
        self,
        layout: ModelLayout,
        tensors: TensorReader,
        token_ids: Sequence[Sequence[int]],
        batch_size: int,
        answer_starts: Sequence[int] | None = None,
    ) -> None:
        self.loader = LayerLoader(layout, tensors)
        self.model = self.loader.model
        self.loader.load("model.embed_tokens")
        self.loader.load("model.rotary_emb")
        self.stream = LayerStream(self.model, token_ids, batch_size, answer_starts)
        self.loader.free("model.embed_tokens")

    def layers(
        self, progress: Progress | None = None, after_layer: Callable[[int], None] | None = None
    ) -> Iterator[int]:
        """Each decoder layer's index, its weights read for the body of the loop and freed after it.

        `progress(n)` is called with the number of layers done so far; `after_layer(l)` right after layer l's
        weights are freed (tests use it to watch memory)."""
        for index in range(self.model.config.num_hidden_layers):
            prefix = f"model.layers.{index}"
            self.loader.load(prefix)
            try:
                yield index
            finally:
                self.loader.free(prefix)
            if after_layer is not None:
                after_layer(index)
            if progress is not None:
                progress(index + 1)
