"""Decoding the concurrent requests of one variant together: one forward pass per step for all of them.

A decode step of a small batch costs little more than a step of one sequence (demo MoE on this CPU:
1.75 ms for one, 2.62 ms for eight), so serving concurrent requests one forward pass each wastes most of
the machine. Each variant gets a `BatchedDecoder`: a thread that admits new requests between steps
(prefilling each alone, then joining its key/value cache to the batch's, left-padded), runs one forward
pass for every active sequence, and lets each request sample from its own seeded generator, apply its
own stop rules and stream its own deltas (`Generation.accept`). A request leaves the batch when all its
choices finish or its client goes away; the thread ends when no work is left.

Batched logits equal single-sequence logits up to float rounding (about 1e-5 here), as in vLLM and
SGLang: greedy answers are the same in practice, and a seeded sample is reproducible for the same
concurrent load. Models whose cache is not a plain per-layer key/value cache are decoded one request
at a time (`Generation`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine import Delta, Generation

log = logging.getLogger("taskmoe.batching")


@dataclass
class _Request:
    generation: Generation
    emit: Callable[[Delta], None] | None
    generator: torch.Generator | None = None
    step: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def batchable(model: PreTrainedModel) -> bool:
    """Plain per-layer key/value caches (no sliding windows, no linear attention) can be joined by rows."""
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the sequence dimension (-2) of a [rows, heads, seq, dim] cache tensor on the left."""
    missing = length - tensor.shape[-2]
    if missing == 0:
        return tensor
    padding = tensor.new_zeros((*tensor.shape[:-2], missing, tensor.shape[-1]))
    return torch.cat([padding, tensor], dim=-2)


class BatchedDecoder:
    def __init__(self, model: PreTrainedModel, max_batch: int = 32) -> None:
        self.model = model
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self._pending: list[_Request] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # the batch: one row per choice of every active request
        self._requests: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached length]: 0 on left padding
        self._positions: torch.Tensor | None = None  # [rows]: the position of each row's next token
        self._tokens: torch.Tensor | None = None  # [rows]: each row's latest token, input of the next step

    def run(self, generation: Generation, emit: Callable[[Delta], None] | None = None) -> Generation:
        """Decode `generation` in the batch, calling `emit` (on the decoder's thread) with each delta; returns
        when it is finished or cancelled."""
        request = _Request(generation, emit)
        with self._lock:
            self._pending.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="taskmoe-decoder", daemon=True)
                self._thread.start()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return generation

    # -- the decoding thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    room = self.max_batch - sum(r.generation.params.n for r in self._requests)
                    admitted = []
                    while self._pending and (
                        self._pending[0].generation.params.n <= room or not self._requests + admitted
                    ):
                        request = self._pending.pop(0)
                        room -= request.generation.params.n
                        admitted.append(request)
                    if not admitted and not self._requests:
                        self._thread = None
                        self._cache = self._mask = self._positions = self._tokens = None
                        return
                try:
                    for request in admitted:
                        self._admit(request)
                    if self._requests:
                        self._step()
                except BaseException as error:  # fail the requests in the batch, keep serving the rest
                    log.exception("batched decoding failed")
                    for request in [*self._requests, *admitted]:
                        self._finish(request, error)
                    self._requests, self._cache = [], None

    def _finish(self, request: _Request, error: BaseException | None = None) -> None:
        if not request.done.is_set():
            request.error = error
            request.done.set()

    def _deliver(self, request: _Request, tokens: list[int]) -> None:
        for delta in request.generation.accept(tokens, request.step):
            if request.emit is not None:
                request.emit(delta)
        request.step += 1

    def _admit(self, request: _Request) -> None:
        """Prefill one request alone, take its first tokens, and join it to the batch."""
        generation = request.generation
        if generation.cancel.is_set():
            generation.cancelled = True
            self._finish(request)
            return
        request.generator = generation.new_generator(self.device)
        cache = DynamicCache(config=self.model.config)
        prompt = torch.tensor([generation.prompt_ids], device=self.device)
        logits = self.model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        n = generation.params.n
        tokens = generation.sample(logits[:, -1, :].expand(n, -1), request.generator)
        self._deliver(request, tokens)
        if generation.finished:
            self._finish(request)
            return
        cache.batch_repeat_interleave(n)
        length = len(generation.prompt_ids)
        self._join(
            request,
            cache,
            torch.ones((n, length), dtype=torch.long, device=self.device),
            torch.full((n,), length, dtype=torch.long, device=self.device),
            torch.tensor(tokens, device=self.device),
        )

    def _join(
        self, request: _Request, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        if self._cache is None or not self._requests:
            self._requests, self._cache = [request], cache
            self._mask, self._positions, self._tokens = mask, positions, tokens
            return
        length = max(self._mask.shape[1], mask.shape[1])
        joined = DynamicCache(config=self.model.config)
        for index, (old, new) in enumerate(zip(self._cache.layers, cache.layers, strict=True)):
            keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
            values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
            joined.update(keys, values, index)
        pad = lambda m: torch.nn.functional.pad(m, (length - m.shape[1], 0))  # noqa: E731
        self._cache = joined
        self._mask = torch.cat([pad(self._mask), pad(mask)])
        self._positions = torch.cat([self._positions, positions])
        self._tokens = torch.cat([self._tokens, tokens])
        self._requests.append(request)

    def _step(self) -> None:
        """One forward pass for every row; each request samples and streams its own tokens."""
        rows = self._tokens.shape[0]
        self._mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=1)
        logits = self.model(
            input_ids=self._tokens.unsqueeze(-1),
            attention_mask=self._mask,
            position_ids=self._positions.unsqueeze(-1),
            past_key_values=self._cache,
            use_cache=True,
        ).logits[:, -1, :]
        self._positions = self._positions + 1
        keep, start, next_tokens = [], 0, []
        for request in self._requests:
            generation, n = request.generation, request.generation.params.n
            if generation.cancel.is_set():
                generation.cancelled = True
                self._finish(request)
            else:
                tokens = generation.sample(logits[start : start + n], request.generator)
                self._deliver(request, tokens)
                if generation.finished:
                    self._finish(request)
                else:
                    keep.extend(range(start, start + n))
                    next_tokens.extend(tokens)
            start += n
        if len(keep) == rows:
            self._tokens = torch.tensor(next_tokens, device=self.device)
            return
        self._requests = [r for r in self._requests if not r.done.is_set()]
        if not keep:
            self._cache = None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask, self._positions = self._mask[index], self._positions[index]
        self._tokens = torch.tensor(next_tokens, device=self.device)
        first = int(self._mask.any(dim=0).nonzero()[0])  # columns that are padding for every row: drop them
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
