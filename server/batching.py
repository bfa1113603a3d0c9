"""Decoding concurrent requests together: one forward pass per step for all of them.

A decode step of a small batch costs little more than a step of one sequence (`scripts/bench_server.py`
measures it), so serving concurrent requests one forward pass each wastes most of
the machine. A MoE model served from the expert pool has one `BatchedDecoder` for all its patterns (each
request brings its pattern's `RowRoute`, and every row routes as its own pattern's variant); otherwise each
variant gets its own. A decoder is a thread that admits new requests between steps
(prefilling those that arrived together in one left-padded pass, then joining their key/value caches to
the batch's, left-padded), runs one forward
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
from server.model.kv_cache import cache_argument
from server.model.pooled import PooledModel, RowRoute

log = logging.getLogger("taskmoe.batching")

IDLE_SECONDS = 2.0
"""How long an idle decoder thread waits for new work before it ends."""


@dataclass
class _Request:
    generation: Generation
    emit: Callable[[Delta], None] | None
    route: RowRoute | None = None  # how its rows route, in a pooled model
    cache: DynamicCache | None = None  # a long prompt's own cache while it is prefilled chunk by chunk
    prefilled: int = 0  # prompt tokens in `cache`
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


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))


class BatchedDecoder:
    """The decoding loop of one model. For a pooled model (`pooled`), every request brings its pattern's
    `RowRoute` and requests of different patterns share the batch: one loop per model, not per variant."""

    def __init__(
        self,
        model: PreTrainedModel,
        max_batch: int = 32,
        pooled: PooledModel | None = None,
        max_prefill_tokens: int | None = None,
    ) -> None:
        """`max_prefill_tokens`: a prompt longer than this is prefilled that many tokens at a time, one chunk
        between two decode steps, so that the batch's streams keep their pace (None: in one pass)."""
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be at least 1")
        self.model = model
        self.pooled = pooled
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._prefilling: list[_Request] = []  # long prompts being prefilled, in arrival order
        self.device = next(model.parameters()).device
        self._pending: list[_Request] = []
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        # the batch: one row per choice of every active request
        self._requests: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached length]: 0 on left padding
        self._positions: torch.Tensor | None = None  # [rows]: the position of each row's next token
        self._tokens: torch.Tensor | None = None  # [rows]: each row's latest token, input of the next step

    def run(
        self, generation: Generation, emit: Callable[[Delta], None] | None = None, route: RowRoute | None = None
    ) -> Generation:
        """Decode `generation` in the batch, calling `emit` (on the decoder's thread) with each delta; returns
        when it is finished or cancelled. A pooled model's requests name their `route`."""
        if (route is None) != (self.pooled is None):
            raise ValueError("a pooled model's requests need a route, and only those")
        request = _Request(generation, emit, route)
        with self._work:
            self._pending.append(request)
            self._work.notify()
            if self._thread is None:
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
                with self._work:
                    if not self._pending and not self._requests and not self._prefilling:
                        self._work.wait(timeout=IDLE_SECONDS)  # stay a moment: the next request is likely near
                    busy = self._requests + self._prefilling
                    room = self.max_batch - sum(r.generation.params.n for r in busy)
                    admitted = []
                    while self._pending and (self._pending[0].generation.params.n <= room or not busy + admitted):
                        request = self._pending.pop(0)
                        room -= request.generation.params.n
                        admitted.append(request)
                    if not admitted and not busy:
                        self._thread = None
                        self._cache = self._mask = self._positions = self._tokens = None
                        return
                long = [r for r in admitted if self._chunked(r)]
                self._prefilling.extend(long)
                admitted = [r for r in admitted if not self._chunked(r)]
                try:
                    if admitted:
                        self._admit(admitted)
                    if self._prefilling:
                        self._prefill_chunk(self._prefilling[0])
                    if self._requests:
                        self._step()
                except BaseException as error:  # fail the requests in the batch, keep serving the rest
                    log.exception("batched decoding failed")
                    for request in [*self._requests, *admitted, *self._prefilling]:
                        self._finish(request, error)
                    self._requests, self._cache, self._prefilling = [], None, []

    def _chunked(self, request: _Request) -> bool:
        limit = self.max_prefill_tokens
        return limit is not None and len(request.generation.prompt_ids) > limit

    def _prefill_chunk(self, request: _Request) -> None:
        """The next `max_prefill_tokens` of a long prompt, in its own cache; after the last chunk its first
        token is sampled and it joins the batch."""
        generation = request.generation
        if self._cancelled(request):
            self._prefilling.remove(request)
            return
        assert self.max_prefill_tokens is not None
        if request.cache is None:
            request.cache = DynamicCache(config=self.model.config)
        prompt = generation.prompt_ids
        start, stop = request.prefilled, min(len(prompt), request.prefilled + self.max_prefill_tokens)
        chunk = torch.tensor([prompt[start:stop]], device=self.device)  # [1, chunk]
        logits = self._forward(
            [request.route],
            input_ids=chunk,
            position_ids=torch.arange(start, stop, device=self.device).unsqueeze(0),
            cache=request.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        request.prefilled = stop
        if stop < len(prompt):
            return
        self._prefilling.remove(request)
        cache, request.cache = request.cache, None
        tokens = self._first_tokens(request, logits)
        if tokens is None:
            return
        n = generation.params.n
        cache.batch_repeat_interleave(n)
        mask = torch.ones((n, len(prompt)), dtype=torch.long, device=self.device)
        positions = torch.full((n,), len(prompt), dtype=torch.long, device=self.device)
        self._join([request], cache, mask, positions, torch.tensor(tokens, device=self.device))

    def _forward(self, routes: list[RowRoute | None], cache: DynamicCache, **inputs: object) -> torch.Tensor:
        """The model's last-position logits [rows, vocab], extending `cache`; in a pooled model row i routes
        as `routes[i]`."""
        inputs |= cache_argument(self.model, cache)
        if self.pooled is None:
            return self.model(**inputs).logits[:, -1, :]
        with self.pooled.rows(routes):  # type: ignore[arg-type]
            return self.model(**inputs).logits[:, -1, :]

    def _finish(self, request: _Request, error: BaseException | None = None) -> None:
        if not request.done.is_set():
            request.error = error
            request.done.set()

    def _deliver(self, request: _Request, tokens: list[int]) -> None:
        for delta in request.generation.accept(tokens, request.step):
            if request.emit is not None:
                request.emit(delta)
        request.step += 1

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill the new requests together (left-padded), take their first tokens, and join them to the
        batch."""
        live = [request for request in requests if not self._cancelled(request)]
        if not live:
            return
        cache, mask, logits = self._prefill_together(live)
        rows, first_tokens, joining = [], [], []
        for row, request in enumerate(live):
            tokens = self._first_tokens(request, logits[row : row + 1])
            if tokens is None:
                continue
            rows.extend([row] * request.generation.params.n)  # each choice its own row of the batch
            first_tokens.extend(tokens)
            joining.append(request)
        if not joining:
            return
        index = torch.tensor(rows, device=self.device)  # [rows of the joining choices]
        cache.batch_select_indices(index)
        lengths = mask[index].sum(-1)  # [rows]: the position of each row's next token
        self._join(joining, cache, mask[index], lengths, torch.tensor(first_tokens, device=self.device))

    def _cancelled(self, request: _Request) -> bool:
        if request.generation.cancel.is_set():
            request.generation.cancelled = True
            self._finish(request)
            return True
        return False

    def _prefill_together(self, live: list[_Request]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One left-padded forward pass over the prompts: their cache, mask [requests, width] and last
        logits [requests, vocab]."""
        width = max(len(r.generation.prompt_ids) for r in live)
        pad = int(getattr(self.model.config, "pad_token_id", None) or 0)
        input_ids = torch.full((len(live), width), pad, dtype=torch.long, device=self.device)  # [requests, width]
        mask = torch.zeros((len(live), width), dtype=torch.long, device=self.device)  # 1 on prompt tokens
        for row, request in enumerate(live):
            ids = request.generation.prompt_ids
            input_ids[row, width - len(ids) :] = torch.tensor(ids, device=self.device)
            mask[row, width - len(ids) :] = 1
        padded = not bool(mask.all())
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(
            [request.route for request in live],
            input_ids=input_ids,
            attention_mask=mask if padded else None,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0) if padded else None,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, mask, logits

    def _first_tokens(self, request: _Request, logits: torch.Tensor) -> list[int] | None:
        """Sample and deliver a request's first token per choice from its prompt's last logits [1, vocab];
        None when that already finishes it."""
        generation = request.generation
        request.generator = generation.new_generator(self.device)
        tokens = generation.sample(logits.expand(generation.params.n, -1), request.generator)
        self._deliver(request, tokens)
        if generation.finished:
            self._finish(request)
            return None
        return tokens

    def _join(
        self,
        requests: list[_Request],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        if self._cache is None or not self._requests:
            self._requests, self._cache = list(requests), cache
            self._mask, self._positions, self._tokens = mask, positions, tokens
            return
        length = max(self._mask.shape[1], mask.shape[1])
        joined = DynamicCache(config=self.model.config)
        for index, (old, new) in enumerate(zip(self._cache.layers, cache.layers, strict=True)):
            keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
            values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
            joined.update(keys, values, index)
        self._cache = joined
        self._mask = torch.cat([_left_pad_mask(self._mask, length), _left_pad_mask(mask, length)])
        self._positions = torch.cat([self._positions, positions])
        self._tokens = torch.cat([self._tokens, tokens])
        self._requests.extend(requests)

    def _step(self) -> None:
        """One forward pass for every row; each request samples and streams its own tokens."""
        rows = self._tokens.shape[0]
        self._mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=1)
        padded = not bool(self._mask.all())  # without padding the model's own causal fast path serves
        logits = self._forward(
            [r.route for r in self._requests for _ in range(r.generation.params.n)],
            input_ids=self._tokens.unsqueeze(-1),
            attention_mask=self._mask if padded else None,
            position_ids=self._positions.unsqueeze(-1) if padded else None,
            cache=self._cache,
            use_cache=True,
        )
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
