"""A completion request, checked and resolved into a `Plan` before any model work starts.

`Ask` is what a client asked, with no HTTP left in it (the API layer builds it from the OpenAI body);
`plan()` refuses what can never be served, cheapest checks first, resolves which patterns serve, and
tokenizes. The same function serves `taskmoe serve` and the Ray Serve app, so both refuse alike.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from server.engine import SamplingParams
from server.errors import ContextTooLong, InvalidRequest
from server.model_info import ModelInfo
from server.resolver import Choice, Resolver

MAX_CHOICES = 128
"""Prompts x n in one request."""


@dataclass(frozen=True)
class Sampling:
    """The body's sampling fields, as sent (None: not given)."""

    max_tokens: int | None = None
    limit_param: str = "max_tokens"  # the field that set `max_tokens` (chat has max_completion_tokens too)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Ask:
    """A chat or text completion request as the client made it."""

    kind: Literal["chat", "text"]
    model: str
    pattern: str | None
    sampling: Sampling
    messages: tuple[dict[str, str], ...] = ()  # chat
    prompts: tuple[str, ...] = ()  # text
    query: str = ""  # what routing looks at
    include_usage: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything a generation needs, checked: it may cross a process (a Ray replica)."""

    kind: Literal["chat", "text"]
    choice: Choice
    model_id: str
    upstream: bool  # another server answers this choice: no prompts, no params
    prompts: tuple[tuple[int, ...], ...] = ()
    params: tuple[SamplingParams, ...] = ()
    request_id: str = ""
    created: int = 0
    include_usage: bool = False

    @property
    def n(self) -> int:
        return self.params[0].n if self.params else 1

    @property
    def fingerprint(self) -> str:
        return f"taskmoe-{self.choice.label}"

    @property
    def headers(self) -> dict[str, str]:
        return {"x-taskmoe-pattern": self.choice.label, "x-taskmoe-route": self.choice.route_header}

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)


def tokens_to_generate(context_length: int | None, prompt_tokens: int, max_tokens: int | None, param: str) -> int:
    """`max_tokens`, or the rest of the context when not given; a request that cannot fit is a 400."""
    if prompt_tokens == 0:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if context_length is None:
        return max_tokens or 256
    room = context_length - prompt_tokens
    if max_tokens is None:
        if room < 1:
            raise ContextTooLong(
                f"the prompt has {prompt_tokens} tokens; this model's context is {context_length}", param="messages"
            )
        return room
    if max_tokens > room:
        raise ContextTooLong(
            f"this model's context is {context_length} tokens; the prompt has {prompt_tokens} and "
            f"{param} asks for {max_tokens} more. Shorten the prompt or lower {param}.",
            param=param,
        )
    return max_tokens


def sampling_params(sampling: Sampling, prompt_tokens: int, context_length: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=tokens_to_generate(context_length, prompt_tokens, sampling.max_tokens, sampling.limit_param),
        temperature=1.0 if sampling.temperature is None else sampling.temperature,
        top_p=1.0 if sampling.top_p is None else sampling.top_p,
        seed=sampling.seed,
        stop=sampling.stop,
        n=sampling.n or 1,
        ignore_eos=sampling.ignore_eos,
    )


def _check_sizes(ask: Ask, info: ModelInfo, max_n: int) -> None:
    """What can be refused from the body alone."""
    n = ask.sampling.n or 1
    if n > max_n:
        raise InvalidRequest(f"n is at most {max_n}", param="n")
    if ask.kind == "text" and len(ask.prompts) * n > MAX_CHOICES:
        raise InvalidRequest(f"at most {MAX_CHOICES} choices per request (prompts x n)", param="prompt")
    if ask.kind == "chat":
        info.check_chat(ask.messages)
    else:
        info.check_prompts(ask.prompts)


def plan(ask: Ask, info: ModelInfo, resolver: Resolver, max_n: int, upstream: Sequence[str] = ()) -> Plan:
    """Check, resolve and tokenize `ask`: refusals from the body first, then which patterns serve (routing
    embeds the query, so it comes after the cheap checks), then the tokens and their limits. A choice an
    upstream server answers (`upstream`: pattern names) is not tokenized here."""
    _check_sizes(ask, info, max_n)
    choice = resolver.resolve(ask.model, ask.pattern, ask.query)
    model_id = choice.served_id(info.name)
    if choice.label in upstream:
        return Plan(ask.kind, choice, model_id, upstream=True)
    prompts = [info.chat_ids(ask.messages)] if ask.kind == "chat" else info.text_ids(ask.prompts)
    params = tuple(sampling_params(ask.sampling, len(ids), info.context_length) for ids in prompts)
    prefix = "chatcmpl" if ask.kind == "chat" else "cmpl"
    return Plan(
        kind=ask.kind,
        choice=choice,
        model_id=model_id,
        upstream=False,
        prompts=tuple(tuple(ids) for ids in prompts),
        params=params,
        request_id=f"{prefix}-{secrets.token_hex(12)}",
        created=int(time.time()),
        include_usage=ask.include_usage,
    )
