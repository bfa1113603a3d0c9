"""The rows of a decoding batch, one per choice of every active request, and what keeps them aligned.

Rows of different lengths share one key/value cache by left padding: every row's cache ends at the same
column, a mask marks the padding (0) apart from the tokens (1), and each row keeps its own next position.
Linear-attention layers (hybrid models) keep a fixed-size state per row instead, which rows join by stacking
(`cache_rows`).
Rows join when their prompts are prefilled (padded on the left to the longer of the two caches), leave
when their request finishes, and columns that are padding for every row left are dropped, so that a long
request that left does not make the others attend over its width.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch
from transformers import Cache

from server.model.cache_rows import drop_columns, join_rows, select_rows

Request = TypeVar("Request")


def left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a [rows, seq] mask on the left with zeros to `length` columns."""
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))


def left_padded(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch: token ids [prompts, width] and mask [prompts, width] (1 on
    prompt tokens)."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, device=device)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


class DecodingRows(Generic[Request]):
    """The batch's state between decode steps: its requests (each holding consecutive rows, one per choice),
    their shared key/value cache, the mask [rows, cached length] (0 on left padding), each row's next
    position [rows] and latest token [rows], the input of the next step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clear()

    def clear(self) -> None:
        """Drop every row (the batch is done, or failed)."""
        self.requests: list[Request] = []
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def join(
        self,
        requests: list[Request],
        cache: Cache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Add the rows of newly prefilled `requests`: their cache and mask, left-padded with the batch's to
        the longer of the two, their next positions and first tokens."""
        if self.cache is None or not self.requests:
            self.requests, self.cache = list(requests), cache
            self.mask, self.positions, self.tokens = mask, positions, tokens
            return
        length = max(self.mask.shape[1], mask.shape[1])
        join_rows(self.cache, cache, length)
        self.mask = torch.cat([left_pad_mask(self.mask, length), left_pad_mask(mask, length)])
        self.positions = torch.cat([self.positions, positions])
        self.tokens = torch.cat([self.tokens, tokens])
        self.requests.extend(requests)

    def step_inputs(self) -> dict[str, torch.Tensor | None]:
        """The next step's inputs: each row's latest token, after growing the mask by its column. The mask
        and positions go in only when some row is left-padded: without padding the model's own causal fast
        path serves."""
        rows = self.tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones((rows, 1))], dim=1)
        padded = not bool(self.mask.all())
        return {
            "input_ids": self.tokens.unsqueeze(-1),
            "attention_mask": self.mask if padded else None,
            "position_ids": self.positions.unsqueeze(-1) if padded else None,
        }

    def advance(self, keep: list[int], tokens: list[int], requests: list[Request]) -> None:
        """After a step: rows `keep` go on with their sampled `tokens` and the others leave the batch;
        `requests` are the requests still running (the rows of `keep`, in order)."""
        self.positions = self.positions + 1
        if len(keep) == self.positions.shape[0]:
            self.tokens = torch.tensor(tokens, device=self.device)
            return
        self.requests = requests
        if not keep:
            self.cache = None
            return
        index = torch.tensor(keep, device=self.device)
        select_rows(self.cache, index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.tokens = torch.tensor(tokens, device=self.device)
        self._drop_padding()

    def _drop_padding(self) -> None:
        """Drop the leading columns that are padding for every row."""
        first = int(self.mask.any(dim=0).nonzero()[0])
        if first > 0:
            self.mask = self.mask[:, first:]
            drop_columns(self.cache, first)
