"""Decode steps of a pooled model with nothing left for Python to do per step: a static KV cache, inputs in
fixed tensors, and on CUDA one captured graph per batch size, replayed.

A GPU decode step of a MoE model is a few milliseconds of kernels; launched one by one from Python (the
attention, norms, routers and grouped expert matmuls of every layer) it costs more than that. A CUDA graph
records the step's kernels once and replays them with one launch. It reads only fixed addresses, so
everything that changes between steps is a tensor written in place before the replay: the rows' tokens and
positions, the attention mask, the KV cache (transformers' `StaticCache`, whose write column is itself a
tensor), and which experts each row may route to (`RouteBuffer`: the rows' route masks, with the pooled
model routing every batch by masks). A task switch copies other masks into the buffer; the slot tables that
map experts to slots are tensors too. The graph stays as it is.

Rows share the cache left-padded, as in `decoding_rows`: prompts end at the same column, a mask marks
padding, each row keeps its own positions. On the CPU the same static step runs eagerly (there are no
graphs), which is how its tests run here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StaticCache

from server.model.kv_cache import cache_argument
from server.model.pooled import PooledModel, RowRoute
from server.model.route_masks import BatchMasks


class RouteBuffer(BatchMasks):
    """The route masks of a fixed number of rows, in one tensor that `assign` rewrites in place."""

    def __init__(self, pooled: PooledModel, rows: int) -> None:
        table = pooled.route_masks
        super().__init__([RowRoute("full")] * rows, table)
        self.pruned_layers = set(table.position)  # always routed by masks: a full-model row is a row of zeros
        self.pruning = True
        self._per_row = torch.zeros((len(table.position), rows, table.width), dtype=torch.bool, device=pooled.device)

    def assign(self, routes: Sequence[RowRoute]) -> None:
        """Route row i as `routes[i]` from the next step on."""
        if len(routes) != len(self.routes):
            raise ValueError(f"{len(routes)} routes for {len(self.routes)} rows")
        self.routes = list(routes)
        self._tokens.clear()
        masks = torch.stack([self.table.pruned(route) for route in routes], dim=1)
        self._per_row.copy_(masks)


class StaticDecodeStep:
    """Prefill and decode `rows` sequences of one pooled model over a static cache of `max_length` columns;
    `graph` (default: on CUDA) captures the decode step as a CUDA graph on its first call."""

    def __init__(self, pooled: PooledModel, rows: int, max_length: int, graph: bool | None = None) -> None:
        self.pooled, self.rows, self.max_length = pooled, rows, max_length
        device = pooled.device
        self.cache = StaticCache(config=pooled.model.config, max_cache_len=max_length)
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, max_length), dtype=torch.long, device=device)
        self.routes = RouteBuffer(pooled, rows)
        self.column = 0  # the next column the cache writes
        self.use_graph = device.type == "cuda" if graph is None else graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, routes: Sequence[RowRoute]
    ) -> torch.Tensor:
        """Fill the cache with left-padded prompts [rows, width] (mask 0 on padding); the last column's logits."""
        width = input_ids.shape[1]
        if width >= self.max_length:
            raise ValueError(f"prompts of {width} tokens leave no room in a cache of {self.max_length}")
        self.cache.reset()
        self.routes.assign(routes)
        self.mask.zero_()
        self.mask[:, :width] = attention_mask
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad(), self.pooled.batch_masks(self.routes):
            out = self.pooled.model(
                input_ids=input_ids,
                attention_mask=self.mask,
                position_ids=positions,
                **cache_argument(self.pooled.model, self.cache),
            )
        self.positions.copy_(positions[:, -1:] + 1)
        self.column = width
        return out.logits[:, -1, :]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: each row's next token [rows] in, its logits [rows, vocab] out (a view that the
        next step overwrites)."""
        if self.column >= self.max_length:
            raise ValueError(f"the static cache of {self.max_length} columns is full")
        self.tokens.copy_(tokens.reshape(self.rows, 1))
        self.mask[:, self.column] = 1
        if not self.use_graph:
            logits = self._forward()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._logits
        self.positions.add_(1)
        self.column += 1
        return logits

    def _forward(self) -> torch.Tensor:
        with torch.no_grad(), self.pooled.batch_masks(self.routes):
            out = self.pooled.model(
                input_ids=self.tokens,
                attention_mask=self.mask,
                position_ids=self.positions,
                **cache_argument(self.pooled.model, self.cache),
            )
        return out.logits[:, -1, :]

    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graphs require), rewind the cache's column, and capture."""
        column = self.cache.layers[0].cumulative_length.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self._rewind(column)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._forward()
        self._rewind(column)  # capturing ran nothing; the replay that follows writes this column

    def _rewind(self, column: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(column)
