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
concurrent load. Hybrid models (linear-attention layers beside full attention) batch too: their per-row
states join and leave with their rows (`cache_rows`). Models with sliding-window layers are decoded one
request at a time (`Generation`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import Cache, PreTrainedModel

from server.decoding_rows import DecodingRows, left_padded
from server.engine import Delta, Generation
from server.model.cache_rows import select_rows
from server.model.coverage_meter import AnswerConfidence, CoverageMeter
from server.model.kv_cache import cache_argument, new_cache
from server.model.pooled import PooledModel, RowRoute
from server.static_rows import StaticRows, static_decodable

log = logging.getLogger("taskmoe.batching")

IDLE_SECONDS = 2.0
"""How long an idle decoder thread waits for new work before it ends."""


@dataclass
class _Request:
    """One request in the decoder: its generation, where its deltas go, and its state between steps."""

    generation: Generation
    emit: Callable[[Delta], None] | None
    route: RowRoute | None = None  # how its rows route, in a pooled model
    cache: Cache | None = None  # a long prompt's own cache while it is prefilled chunk by chunk
    prefilled: int = 0  # prompt tokens in `cache`
    generator: torch.Generator | None = None
    step: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    meter: CoverageMeter | None = None  # the pool's coverage meter (None: off)
    confidence: AnswerConfidence | None = None  # its generated tokens' probabilities, when watched

    def finish(self, error: BaseException | None = None) -> None:
        """Hand the generation (or `error`) back to the caller waiting in `BatchedDecoder.run`."""
        if not self.done.is_set():
            self.error = error
            watched = error is None and not self.generation.cancelled
            if watched and self.meter is not None and self.confidence is not None:
                self.meter.finish_watch(self.route, self.confidence)
            self.done.set()

    def cancelled(self) -> bool:
        """True, and finished, when its client went away."""
        if self.generation.cancel.is_set():
            self.generation.cancelled = True
            self.finish()
            return True
        return False

    def sample(self, logits: torch.Tensor) -> list[int] | None:
        """Sample each choice's next token from its row of `logits` [n, vocab] and stream the deltas; the
        tokens, or None when that finishes the request."""
        tokens = self.generation.sample(logits, self.generator)
        if self.confidence is not None:
            self.confidence.add(logits, tokens)
        for delta in self.generation.accept(tokens, self.step):
            if self.emit is not None:
                self.emit(delta)
        self.step += 1
        if self.generation.finished:
            self.finish()
            return None
        return tokens

    def first_tokens(self, logits: torch.Tensor, device: torch.device) -> list[int] | None:
        """Each choice's first token, from the prompt's last logits [1, vocab] (`sample`)."""
        self.generator = self.generation.new_generator(device)
        return self.sample(logits.expand(self.generation.params.n, -1))


BATCHABLE_LAYERS = frozenset({"full_attention", "linear_attention"})
"""Layer kinds whose caches join by rows: growing keys and values (left-padded), or a fixed-size state per row."""


def batchable(model: PreTrainedModel) -> bool:
    """Full-attention and linear-attention layers can be joined by rows; sliding windows cannot."""
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(kind in BATCHABLE_LAYERS for kind in getattr(config, "layer_types", None) or [])


class BatchedDecoder:
    """The decoding loop of one model. For a pooled model (`pooled`), every request brings its pattern's
    `RowRoute` and requests of different patterns share the batch: one loop per model, not per variant."""

    def __init__(
        self,
        model: PreTrainedModel,
        max_batch: int = 32,
        pooled: PooledModel | None = None,
        max_prefill_tokens: int | None = None,
        static_length: int | None = None,
        graphs: bool | None = None,
    ) -> None:
        """`max_prefill_tokens`: a prompt longer than this is prefilled that many tokens at a time, one chunk
        between two decode steps, so that the batch's streams keep their pace (None: in one pass).
        `static_length`: a pooled model's requests whose prompt and new tokens fit in this many columns
        decode in a static cache (`static_rows`), each step a CUDA graph where `graphs` (default: on CUDA);
        the others, and every request when None, in the growing cache of `decoding_rows`."""
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
        self._rows: DecodingRows[_Request] = DecodingRows(self.device)  # the batch
        self._static: StaticRows[_Request] | None = None  # the batch's rows in a static cache
        if static_length is not None and pooled is not None and static_decodable(model):
            self._static = StaticRows(pooled, max_batch, static_length, graphs)

    @property
    def static(self) -> StaticRows[_Request] | None:
        """The rows in a static cache (None: every row decodes in the growing cache)."""
        return self._static

    def run(
        self, generation: Generation, emit: Callable[[Delta], None] | None = None, route: RowRoute | None = None
    ) -> Generation:
        """Decode `generation` in the batch, calling `emit` (on the decoder's thread) with each delta; returns
        when it is finished or cancelled. A pooled model's requests name their `route`."""
        if (route is None) != (self.pooled is None):
            raise ValueError("a pooled model's requests need a route, and only those")
        request = _Request(generation, emit, route)
        meter = self.pooled.coverage if self.pooled is not None else None
        if meter is not None:
            request.meter, request.confidence = meter, meter.watch(route)
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
                admitted = self._take_pending()
                if admitted is None:
                    return
                self._prefilling.extend(r for r in admitted if self._chunked(r))
                admitted = [r for r in admitted if not self._chunked(r)]
                try:
                    if admitted:
                        self._admit(admitted)
                    if self._prefilling:
                        self._prefill_chunk(self._prefilling[0])
                    for rows in self._batches():
                        if rows.requests:
                            self._step(rows)
                except BaseException as error:  # fail the requests in the batch, keep serving the rest
                    log.exception("batched decoding failed")
                    for request in [*self._decoding(), *admitted, *self._prefilling]:
                        request.finish(error)
                    self._clear()
                    self._prefilling = []

    def _batches(self) -> list[DecodingRows[_Request] | StaticRows[_Request]]:
        return [self._rows] if self._static is None else [self._rows, self._static]

    def _decoding(self) -> list[_Request]:
        """The requests whose rows are in the batch."""
        return [request for rows in self._batches() for request in rows.requests]

    def _clear(self) -> None:
        for rows in self._batches():
            rows.clear()

    def _take_pending(self) -> list[_Request] | None:
        """The pending requests that fit beside the busy ones (first come, first served; one always fits an
        idle decoder), after waiting a moment when idle; None when no work is left (the thread ends)."""
        with self._work:
            if not self._pending and not self._decoding() and not self._prefilling:
                self._work.wait(timeout=IDLE_SECONDS)  # stay a moment: the next request is likely near
            busy = self._decoding() + self._prefilling
            room = self.max_batch - sum(r.generation.params.n for r in busy)
            admitted: list[_Request] = []
            while self._pending and (self._pending[0].generation.params.n <= room or not busy + admitted):
                request = self._pending.pop(0)
                room -= request.generation.params.n
                admitted.append(request)
            if not admitted and not busy:
                self._thread = None
                self._clear()
                return None
            return admitted

    def _chunked(self, request: _Request) -> bool:
        limit = self.max_prefill_tokens
        return limit is not None and len(request.generation.prompt_ids) > limit

    def _prefill_chunk(self, request: _Request) -> None:
        """The next `max_prefill_tokens` of a long prompt, in its own cache; after the last chunk its first
        token is sampled and it joins the batch."""
        generation = request.generation
        if request.cancelled():
            self._prefilling.remove(request)
            return
        assert self.max_prefill_tokens is not None
        if request.cache is None:
            request.cache = new_cache(self.model.config)
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
        tokens = request.first_tokens(logits, self.device)
        if tokens is None:
            return
        mask = torch.ones((1, len(prompt)), dtype=torch.long, device=self.device)
        self._join([request], cache, mask, [0] * generation.params.n, tokens)

    def _forward(self, routes: list[RowRoute | None], cache: Cache, **inputs: object) -> torch.Tensor:
        """The model's last-position logits [rows, vocab], extending `cache`; in a pooled model row i routes
        as `routes[i]`."""
        inputs |= cache_argument(self.model, cache)
        if self.pooled is None:
            return self.model(**inputs).logits[:, -1, :]
        with self.pooled.rows(routes, attention_mask=inputs.get("attention_mask")):  # type: ignore[arg-type]
            return self.model(**inputs).logits[:, -1, :]

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill the new requests together (left-padded), take their first tokens, and join them to the
        batch."""
        live = [request for request in requests if not request.cancelled()]
        if not live:
            return
        cache, mask, logits = self._prefill_together(live)
        rows, first_tokens, joining = [], [], []
        for row, request in enumerate(live):
            tokens = request.first_tokens(logits[row : row + 1], self.device)
            if tokens is None:
                continue
            rows.extend([row] * request.generation.params.n)  # each choice its own row of the batch
            first_tokens.extend(tokens)
            joining.append(request)
        if joining:
            self._join(joining, cache, mask, rows, first_tokens)

    def _join(
        self, requests: list[_Request], cache: Cache, mask: torch.Tensor, rows: list[int], tokens: list[int]
    ) -> None:
        """Join the prefilled `requests` to the batch: their choices are rows `rows` of the prefill's `cache`
        and `mask`, with first `tokens`. Those that fit the static cache go there, the others to the growing
        one. A route with novices decodes in the growing one: a captured step reads route masks only, and
        novices are per-row tables."""
        static = self._static
        fits = [
            static is not None
            and static.fits(len(r.generation.prompt_ids), r.generation.params.max_tokens)
            and not (r.route is not None and r.route.novices)
            for r in requests
        ]
        for into_static in (True, False):
            chosen, index, first = [], [], []
            start = 0
            for request, fit in zip(requests, fits, strict=True):
                n = request.generation.params.n
                if fit == into_static:
                    chosen.append(request)
                    index += rows[start : start + n]
                    first += tokens[start : start + n]
                start += n
            if not chosen:
                continue
            index_tensor = torch.tensor(index, device=self.device)  # [rows of the joining choices]
            lengths = mask[index_tensor].sum(-1)  # [rows]: the position of each row's next token
            first_tensor = torch.tensor(first, device=self.device)
            if into_static:
                routes = [r.route for r in chosen for _ in range(r.generation.params.n)]
                static.join(chosen, routes, cache, mask, index_tensor, lengths, first_tensor)
            else:
                select_rows(cache, index_tensor)
                self._rows.join(chosen, cache, mask[index_tensor], lengths, first_tensor)

    def _prefill_together(self, live: list[_Request]) -> tuple[Cache, torch.Tensor, torch.Tensor]:
        """One left-padded forward pass over the prompts: their cache, mask [requests, width] and last
        logits [requests, vocab]."""
        pad = int(getattr(self.model.config, "pad_token_id", None) or 0)
        input_ids, mask = left_padded([r.generation.prompt_ids for r in live], pad, self.device)
        padded = not bool(mask.all())
        cache = new_cache(self.model.config)
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

    def _step(self, rows: DecodingRows[_Request] | StaticRows[_Request]) -> None:
        """One forward pass for every row; each request samples and streams its own tokens."""
        if isinstance(rows, StaticRows):
            logits = rows.step()
        else:
            routes = [r.route for r in rows.requests for _ in range(r.generation.params.n)]
            logits = self._forward(routes, cache=rows.cache, use_cache=True, **rows.step_inputs())
        keep, start, next_tokens = [], 0, []
        for request in rows.requests:
            n = request.generation.params.n
            tokens = None if request.cancelled() else request.sample(logits[start : start + n])
            if tokens is not None:
                keep.extend(range(start, start + n))
                next_tokens.extend(tokens)
            start += n
        rows.advance(keep, next_tokens, [r for r in rows.requests if not r.done.is_set()])
