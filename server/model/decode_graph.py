"""What a decode step captured as a CUDA graph reads and how it is captured (`static_rows` runs the steps).

A GPU decode step of a MoE model is a few milliseconds of kernels; launched one by one from Python (the
attention, norms, routers and grouped expert matmuls of every layer) it costs more than that. A CUDA graph
records the step's kernels once and replays them with one launch. It reads only fixed addresses, so
everything that changes between steps is a tensor written in place before the replay: the rows' tokens and
positions, the attention mask, the KV cache (transformers' `StaticCache`, whose write column is itself a
tensor), and which experts each row may route to (`RouteBuffer`: the rows' route masks, with the pooled
model routing every batch by masks). A task switch copies other masks into the buffer; the slot tables that
map experts to slots are tensors too. The graph stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from server.model.pooled import PooledModel, RowRoute
from server.model.route_masks import BatchMasks


class RouteBuffer(BatchMasks):
    """The route masks of a fixed number of rows, in one tensor that `assign` rewrites in place."""

    def __init__(self, pooled: PooledModel, rows: int, per_row: torch.Tensor | None = None) -> None:
        table = pooled.route_masks
        super().__init__([RowRoute("full")] * rows, table)
        self.pruned_layers = set(table.position)  # always routed by masks: a full-model row is a row of zeros
        self.pruning = True
        shape = (len(table.position), rows, table.width)
        self._per_row = torch.zeros(shape, dtype=torch.bool, device=pooled.device) if per_row is None else per_row

    def first(self, pooled: PooledModel, rows: int) -> RouteBuffer:
        """The first `rows` rows, sharing this buffer's tensor (what a step over fewer rows reads)."""
        return RouteBuffer(pooled, rows, self._per_row[:, :rows])

    def assign(self, routes: Sequence[RowRoute]) -> None:
        """Route row i as `routes[i]` from the next step on."""
        if len(routes) != len(self.routes):
            raise ValueError(f"{len(routes)} routes for {len(self.routes)} rows")
        self.routes = list(routes)
        self._tokens.clear()
        masks = torch.stack([self.table.pruned(route) for route in routes], dim=1)
        self._per_row.copy_(masks)


def capture(forward: Callable[[], torch.Tensor], counters: Sequence[torch.Tensor], pool: Any = None) -> tuple:
    """`forward` captured as a CUDA graph: (the graph, the logits tensor its replays write). It runs once on
    a side stream first (as capture requires); `counters` (the cache layers' write columns, which every run
    advances) are then put back, so that the first replay writes the column the warm-up wrote."""
    saved = [counter.clone() for counter in counters]

    def rewind() -> None:
        for counter, value in zip(counters, saved, strict=True):
            counter.copy_(value)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        logits = forward()
    rewind()  # capturing ran nothing; the replay that follows writes this column
    return graph, logits
