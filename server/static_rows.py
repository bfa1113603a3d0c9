"""The rows of a pooled model's decoding batch in a static KV cache, so that each step can be a CUDA graph.

`decoding_rows.DecodingRows` grows, joins and trims its cache tensors as rows come and go: every step has
new shapes, which a captured graph cannot follow. Here the cache is allocated once, [capacity rows, heads,
`max_length` columns, dim] per layer, and every step runs over its first rows and columns: the active rows
are kept at the front, and a step over `r` rows and `c` columns uses the graph captured for the smallest row
and column sizes (powers of two) that hold them, made the first time that size is needed. Between steps,
rows join and leave by copies into the fixed tensors:

- a joining request's prompt (prefilled with a dynamic cache, as in `BatchedDecoder`) is copied into the
  next free rows, left-padded so that it ends at the batch's write column, like every other row;
- a leaving row's place is taken by the rows after it (one gather per layer);
- when the leading columns are padding for every row, or the write column reaches the end, the rows are
  moved left (`compact`), so that the columns a step reads stay near what the rows hold.

Rows past the active ones run as padding (a step over 5 rows runs the 8-row graph): their tokens attend only
to themselves and route as the first row, so they never ask for an expert that is not resident. A request
fits when its prompt and all its new tokens fit in `max_length` columns; the decoder keeps the others on
the dynamic path. On the CPU the same steps run eagerly (there are no graphs), which is how the tests check
them against each pattern's own variant.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from transformers import Cache, StaticCache

from server.model.decode_graph import RouteBuffer, capture
from server.model.kv_cache import cache_argument
from server.model.pooled import PooledModel, RowRoute

log = logging.getLogger("taskmoe.static_rows")

Request = TypeVar("Request")

SMALLEST_COLUMNS = 128
"""The narrowest column size a step runs over."""


def sizes(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit`: the sizes steps are captured at."""
    found, size = [], smallest
    while size < limit:
        found.append(size)
        size *= 2
    return [*found, limit]


def static_decodable(model: Any) -> bool:
    """Every layer keeps keys and values per column (no linear-attention state, no sliding window)."""
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])


@dataclass
class _Step:
    """The step over the first `rows` rows and `columns` columns: views of the batch's tensors, and its graph."""

    cache: StaticCache
    routes: RouteBuffer
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None


class StaticRows(Generic[Request]):
    """Active rows in a static cache of `capacity` rows and `max_length` columns; `graphs` (default: on
    CUDA) captures each step size as a CUDA graph the first time it runs."""

    def __init__(self, pooled: PooledModel, capacity: int, max_length: int, graphs: bool | None = None) -> None:
        if max_length < 2:
            raise ValueError("a static cache needs at least 2 columns")
        self.pooled, self.capacity, self.max_length = pooled, capacity, max_length
        device = pooled.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.storage = StaticCache(config=pooled.model.config, max_cache_len=max_length)
        self.tokens = torch.zeros((capacity, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((capacity, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((capacity, max_length), dtype=torch.long, device=device)
        self.route_buffer = RouteBuffer(pooled, capacity)
        self.row_sizes = sizes(capacity)
        self.column_sizes = sizes(max_length, min(SMALLEST_COLUMNS, max_length))
        self._steps: dict[tuple[int, int], _Step] = {}
        self._pool: Any = None  # the memory pool every graph of this batch shares
        self.steps = 0  # decode steps run, for the cache report
        self.graph_error: str | None = None  # why steps run without graphs on CUDA, if capture failed
        self.clear()

    def clear(self) -> None:
        """Drop every row."""
        self.requests: list[Request] = []
        self.routes: list[RowRoute] = []  # each active row's route
        self.starts: list[int] = []  # each active row's first column (kept on the host: no device reads)
        self.column = 0  # the column the next step writes
        self.mask.zero_()
        self._set_column(0)

    @property
    def rows(self) -> int:
        return len(self.starts)

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """A request fits when its prompt and every token it may add fit in the cache's columns."""
        return prompt_tokens + max_tokens <= self.max_length

    # -- rows coming and going ------------------------------------------------------------------

    def join(
        self,
        requests: list[Request],
        routes: Sequence[RowRoute],
        cache: Cache,
        mask: torch.Tensor,
        index: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Add rows `index` of a left-padded prefill (`cache`, `mask` [prompts, width]), routed as `routes`,
        with their next positions and first tokens [rows]; the cache is read, not changed."""
        count = len(index)
        if self.rows + count > self.capacity:
            raise ValueError(f"{self.rows} + {count} rows do not fit in {self.capacity}")
        index = index.to(self.mask.device)
        rows_mask = mask.index_select(0, index)
        pads = (rows_mask.shape[1] - rows_mask.sum(dim=1)).tolist()
        width = rows_mask.shape[1] - min(pads)  # the columns these rows' tokens span (all end at the last)
        self._init_storage(cache)
        self.compact()
        if width > self.column:  # move the rows right so that the new ones fit to the left of the column
            self._move(0, width - self.column)
        start, stop, first = self.rows, self.rows + count, self.column - width
        for layer, source in zip(self.storage.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                rows = getattr(source, name).index_select(0, index.to(getattr(source, name).device))
                getattr(layer, name)[start:stop, :, first : self.column] = rows[:, :, -width:]
        self.mask[start:stop].zero_()
        self.mask[start:stop, first : self.column] = rows_mask[:, -width:]
        self.positions[start:stop, 0] = positions
        self.tokens[start:stop, 0] = tokens
        self.starts += [first + pad - (rows_mask.shape[1] - width) for pad in pads]
        self.requests += requests
        self.routes += list(routes)
        self._assign_routes()

    def advance(self, keep: list[int], tokens: list[int], requests: list[Request]) -> None:
        """After a step: rows `keep` go on with their sampled `tokens` (moved to the front, in order), the
        others leave; `requests` are those still running."""
        count = len(keep)
        if count != self.rows:
            self.requests = requests
            self._keep(keep)
        if count == 0:
            self.clear()
            return
        self.tokens[:count, 0] = torch.tensor(tokens, device=self.tokens.device)

    def compact(self) -> None:
        """Move every row left by the leading columns that are padding for all of them."""
        if self.starts and min(self.starts) > 0:
            self._move(min(self.starts), -min(self.starts))

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One decode step of every active row: logits [rows, vocab] (a view the next step overwrites)."""
        if self.column >= self.max_length or (self.starts and min(self.starts) >= self.column - min(self.starts)):
            self.compact()  # the cache is full, or more than half of what a step reads is padding
        if self.column >= self.max_length:
            raise RuntimeError(f"rows longer than the static cache's {self.max_length} columns")
        rows = next(size for size in self.row_sizes if size >= self.rows)
        columns = next(size for size in self.column_sizes if size > self.column)
        self.mask[:rows, self.column] = 1
        step = self._steps.get((rows, columns)) or self._new_step(rows, columns)
        meter = self.pooled.coverage
        if meter is not None and meter.draw():  # a coverage sample runs the step eagerly, the full routers too
            active = (torch.arange(rows, device=self.mask.device) < self.rows).unsqueeze(1)  # padding rows: 0
            logits = self._forward(step, rows, columns, sample=True, active=active)
        else:
            if self.graphs and step.graph is None:
                self._capture(step, rows, columns)
            if step.graph is not None:
                step.graph.replay()
                logits = step.logits
            else:
                logits = self._forward(step, rows, columns)
        self.positions[:rows] += 1
        self.column += 1
        self.steps += 1
        return logits[: self.rows]

    def report(self) -> dict[str, Any]:
        """What `/admin/cache` shows of the static cache: its size, its use, the step sizes captured."""
        kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.storage.layers if layer.is_initialized)
        captured = sorted(f"{rows}x{columns}" for (rows, columns), step in self._steps.items() if step.graph)
        return {
            "rows": self.capacity,
            "columns": self.max_length,
            "kv_bytes": kv_bytes,
            "active_rows": self.rows,
            "steps": self.steps,
            "graphs": captured,
            "graph_error": self.graph_error,
        }

    def _forward(
        self, step: _Step, rows: int, columns: int, sample: bool = False, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad(), self.pooled.batch_masks(step.routes, sample=sample, attention_mask=active):
            out = self.pooled.model(
                input_ids=self.tokens[:rows],
                attention_mask=self.mask[:rows, :columns],
                position_ids=self.positions[:rows],
                **cache_argument(self.pooled.model, step.cache),
            )
        return out.logits[:, -1, :]

    def _capture(self, step: _Step, rows: int, columns: int) -> None:
        """Capture the step; if the model's code cannot be captured, say why once and run steps eagerly."""
        counters = [layer.cumulative_length for layer in self.storage.layers]
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            step.graph, step.logits = capture(lambda: self._forward(step, rows, columns), counters, self._pool)
        except RuntimeError as error:
            self.graphs, self.graph_error = False, f"{type(error).__name__}: {error}"
            log.warning("decoding without CUDA graphs: capturing the step failed (%s)", self.graph_error)
            step.graph = None
            self._set_column(self.column)  # the warm-up run may have advanced the write column
            return
        log.info("captured the decode step over %d rows and %d columns as a CUDA graph", rows, columns)

    def _new_step(self, rows: int, columns: int) -> _Step:
        """Views of the storage's first rows and columns, as a cache the model's layers write in place."""
        view = StaticCache(config=self.pooled.model.config, max_cache_len=columns)
        for layer, whole in zip(view.layers, self.storage.layers, strict=True):
            for name in ("device", "num_heads", "k_head_dim", "v_head_dim", "cumulative_length"):
                setattr(layer, name, getattr(whole, name))
            layer.keys, layer.values = whole.keys[:rows, :, :columns], whole.values[:rows, :, :columns]
            layer.batch_size, layer.is_initialized = rows, True
        step = _Step(view, self.route_buffer.first(self.pooled, rows))
        step.routes.routes = self.route_buffer.routes[:rows]
        self._steps[(rows, columns)] = step
        return step

    # -- moving rows and columns -------------------------------------------------------------------

    def _init_storage(self, cache: Cache) -> None:
        """Allocate the storage the first time, shaped like a prefill's layers (heads, dims, dtype)."""
        for layer, source in zip(self.storage.layers, cache.layers, strict=True):
            if not layer.is_initialized:
                keys, values = source.keys[:1], source.values[:1]
                layer.lazy_initialization(
                    keys.expand(self.capacity, *keys.shape[1:]), values.expand(self.capacity, *values.shape[1:])
                )

    def _move(self, first: int, shift: int) -> None:
        """Move columns [first, column) of every active row by `shift` (negative: left)."""
        rows, stop = self.rows, self.column
        for layer in self.storage.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                tensor[:rows, :, first + shift : stop + shift] = tensor[:rows, :, first:stop].clone()
        moved = self.mask[:rows, first:stop].clone()
        self.mask.zero_()
        self.mask[:rows, first + shift : stop + shift] = moved
        self.starts = [start + shift for start in self.starts]
        self._set_column(stop + shift)

    def _keep(self, keep: list[int]) -> None:
        """Rows `keep` become rows 0, 1, ...; the rest are free."""
        count, stop = len(keep), self.column
        if keep != list(range(count)):  # rows that stay move up into the places of rows that left
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            for layer in self.storage.layers:
                for name in ("keys", "values"):
                    tensor = getattr(layer, name)
                    tensor[:count, :, :stop] = tensor[:, :, :stop].index_select(0, index)
            self.mask[:count] = self.mask.index_select(0, index)
            self.positions[:count] = self.positions.index_select(0, index)
        self.mask[count:].zero_()
        self.positions[count:].zero_()
        self.starts = [self.starts[row] for row in keep]
        self.routes = [self.routes[row] for row in keep]
        if count:
            self._assign_routes()

    def _assign_routes(self) -> None:
        """The active rows' routes; the free rows route as the first row (its experts are resident)."""
        self.route_buffer.assign(self.routes + [self.routes[0]] * (self.capacity - self.rows))
        for (rows, _), step in self._steps.items():  # the steps' views name their rows' routes (coverage)
            step.routes.routes = self.route_buffer.routes[:rows]

    def _set_column(self, column: int) -> None:
        self.column = column
        for layer in self.storage.layers:
            layer.cumulative_length.fill_(column)
