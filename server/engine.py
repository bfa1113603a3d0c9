"""Token-by-token decoding for the server: sampling, stop strings, streaming deltas, cancellation.

Written by hand rather than through `model.generate` for three reasons a server has and a script does not:
each request samples from its own seeded `torch.Generator` (generate samples from the process-wide RNG,
which concurrent requests would share, so `seed` would not reproduce); a client that disconnects stops
its generation at the next token (`cancel`); and text is streamed as it is decided, holding back only the
tail that could still turn into a stop string. Greedy decoding is tested to give exactly what
`model.generate` gives, and `scripts/bench_server.py` times both.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.model.kv_cache import cache_argument, new_cache


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    ignore_eos: bool = False


@dataclass(frozen=True)
class Delta:
    """New text of one choice; `finish_reason` is set on the choice's last delta ('stop' or 'length')."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class _Choice:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    finish_reason: str | None = None
    # incremental detokenization: `ids[prefix:read]` is the context that makes the next tokens' text come
    # out right (a token's text can depend on its neighbours); `ids[read:]` are not in `text` yet
    prefix: int = 0
    read: int = 0


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (or an unfinished
    multi-byte character) and so must not be sent yet."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold


GREEDY_BELOW = 1e-5
"""Temperatures this small are greedy decoding (dividing by them overflows the softmax)."""


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next token per row of `logits` [rows, vocab]."""
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p  # always keeps the top token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generation:
    """One request's decoding. Iterate it for `Delta`s; afterwards `choices`, `completion_tokens` and
    `cancelled` describe the outcome."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_ids: Sequence[int] = (),
        cancel: threading.Event | None = None,
    ) -> None:
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_ids = list(prompt_ids)
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.cancel = cancel or threading.Event()
        self.choices = [_Choice() for _ in range(params.n)]
        self.cancelled = False
        self.seed = params.seed % 2**63 if params.seed is not None else secrets.randbits(63)

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.ids) for choice in self.choices)

    def __iter__(self) -> Iterator[Delta]:
        device = next(self.model.parameters()).device
        generator = self.new_generator(device)
        with torch.inference_mode():
            input_ids = torch.tensor([self.prompt_ids] * self.params.n, device=device)
            cache = new_cache(self.model.config)
            cached = cache_argument(self.model, cache)
            logits = self.model(input_ids=input_ids, **cached, use_cache=True, logits_to_keep=1).logits
            for step in range(self.params.max_tokens):
                if self.cancel.is_set():
                    self.cancelled = True
                    return
                tokens = _sample(logits[:, -1, :], self.params, generator).tolist()
                yield from self.accept(tokens, step)
                if self.finished:
                    return
                next_ids = torch.tensor(tokens, device=device).unsqueeze(-1)
                logits = self.model(input_ids=next_ids, **cached, use_cache=True).logits

    # -- one decoding step, shared with the batched decoder ------------------------------------------

    def new_generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def sample(self, logits: torch.Tensor, generator: torch.Generator) -> list[int]:
        """The next token of each choice, from the choices' last logits [n, vocab]."""
        return _sample(logits, self.params, generator).tolist()

    @property
    def finished(self) -> bool:
        return all(choice.finish_reason for choice in self.choices)

    def accept(self, tokens: Sequence[int], step: int) -> list[Delta]:
        """Take step `step`'s token of every choice (finished choices ignore theirs); the new text."""
        last_step = step == self.params.max_tokens - 1
        deltas = []
        for index, (choice, token) in enumerate(zip(self.choices, tokens, strict=True)):
            if choice.finish_reason is None:
                delta = self._advance(index, choice, token, last_step)
                if delta is not None:
                    deltas.append(delta)
        return deltas

    def _advance(self, index: int, choice: _Choice, token: int, last_step: bool) -> Delta | None:
        end_of_sequence = token in self.eos_ids
        before = len(choice.text)
        if not end_of_sequence:
            choice.ids.append(token)
        self._detokenize(choice, final=end_of_sequence or last_step)
        stops = self.params.stop
        # only the new text (and the stop's length before it) can hold a stop string that was not there before
        cut = min((p for p in (choice.text.find(s, max(0, before - len(s) + 1)) for s in stops) if p >= 0), default=-1)
        if cut >= 0:
            choice.text = choice.text[:cut]
            choice.finish_reason = "stop"
        elif end_of_sequence:
            choice.finish_reason = "stop"
        elif last_step:
            choice.finish_reason = "length"
        end = len(choice.text) if choice.finish_reason else len(choice.text) - _held_back(choice.text, self.params.stop)
        if end <= choice.emitted and choice.finish_reason is None:
            return None
        text = choice.text[choice.emitted : max(end, choice.emitted)]
        choice.emitted = max(end, choice.emitted)
        return Delta(index, text, choice.finish_reason)

    def _detokenize(self, choice: _Choice, final: bool) -> None:
        """Append the text of the tokens not yet in `choice.text`, decoding only a short window (the whole
        sequence each step is quadratic in its length). Text that ends in an unfinished character waits for
        the next token, unless this is the last one."""
        if choice.read == len(choice.ids):
            return
        decode = self.tokenizer.decode
        known = decode(choice.ids[choice.prefix : choice.read], skip_special_tokens=True)
        extended = decode(choice.ids[choice.prefix :], skip_special_tokens=True)
        if len(extended) > len(known) and (final or not extended.endswith("\ufffd")):
            choice.text += extended[len(known) :]
            choice.prefix, choice.read = choice.read, len(choice.ids)
        elif final:
            choice.read = len(choice.ids)

    def run(self) -> Generation:
        """Decode to the end without streaming."""
        for _ in self:
            pass
        return self
