"""What turns an OpenAI request into a generation, shared by `taskmoe serve` and the Ray Serve app so that
the two answer alike: the model list, the chat template, the length rules, the sampling parameters and the
tokens that end a generation. No HTTP here: a bad request raises a domain error (`server.errors`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig, PreTrainedTokenizerBase

from pattern_store.store import PatternStore
from server.config import FULL_MODEL
from server.engine import SamplingParams
from server.errors import ContextTooLong, InvalidRequest, ModelNotFound, PatternNotFound
from server.routing import UNION_SEPARATOR, RouteDecision

MAX_CHARACTERS_PER_TOKEN = 32
"""A text longer than this many characters per context token cannot fit: refused untokenized."""


def model_ids(model_name: str, patterns: Iterable[str]) -> list[str]:
    """`GET /v1/models`: the model (routed) and `MODEL@PATTERN` for every stored pattern."""
    return [model_name, *(f"{model_name}@{name}" for name in patterns)]


def served_id(model_name: str, pattern: str | None) -> str:
    """The `model` field of a response: which variant answered (None: the full model)."""
    return f"{model_name}@{pattern}" if pattern and pattern != FULL_MODEL else model_name


def character_limit(context_length: int | None) -> int:
    return MAX_CHARACTERS_PER_TOKEN * (context_length or 2**20)


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], context_length: int | None
) -> list[int]:
    """Token ids of a conversation through the model's chat template. A conversation too long for the
    context at any tokenization is refused before it is tokenized (that is where the time goes)."""
    characters = sum(len(str(message.get("content") or "")) for message in messages)
    if characters > character_limit(context_length):
        raise ContextTooLong(
            f"messages of {characters} characters cannot fit this model's context of {context_length} tokens",
            param="messages",
        )
    try:
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    except Exception as error:  # the model's own template rejects the conversation (jinja raises)
        raise InvalidRequest(f"the model's chat template rejects these messages: {error}", param="messages") from None
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@dataclass(frozen=True)
class Resolved:
    """Which pattern serves a request (`a`, a union `a+b`, None: the full model) and how it was chosen."""

    pattern: str | None
    how: str  # "explicit", or the router's reason ("classifier", "union", "below-threshold", ...)
    probability: float | None = None  # the router's calibrated probability for its choice
    decision: RouteDecision | None = None

    @property
    def label(self) -> str:
        return self.pattern or FULL_MODEL

    @property
    def patterns(self) -> list[str]:
        """The stored patterns that serve (a union has several; the full model none)."""
        return self.pattern.split(UNION_SEPARATOR) if self.pattern else []

    @property
    def route_header(self) -> str:
        """`x-taskmoe-route`: how the pattern was chosen and, when routed, the router's probability."""
        return self.how if self.probability is None else f"{self.how}; p={self.probability:.3f}"


def explicit_choice(model: str, pattern: str | None, model_name: str, store: PatternStore) -> Resolved | None:
    """The pattern a request names (`MODEL@PATTERN` or the `pattern` field; `full`: the full model; `a+b`:
    the union of patterns a and b), or None when it names none and must be routed. Unknown models and
    patterns are errors."""
    name, at, suffix = model.partition("@")
    if at and not suffix:
        raise InvalidRequest(f"model {model!r} names no pattern after '@'", param="model")
    if name != model_name:
        raise ModelNotFound(
            f"model {model!r} does not exist; this server serves {model_name!r} (see /v1/models)", param="model"
        )
    if suffix and pattern and suffix != pattern:
        raise InvalidRequest(f"model names pattern {suffix!r} but the pattern field says {pattern!r}", param="pattern")
    explicit = suffix or pattern
    if not explicit:
        return None
    if explicit == FULL_MODEL:
        return Resolved(None, "explicit")
    names = sorted(set(explicit.split(UNION_SEPARATOR)))
    if "" in names:
        raise InvalidRequest(
            f"{explicit!r} names an empty pattern; a union is PATTERN+PATTERN", param="model" if suffix else "pattern"
        )
    for name in names:
        if name not in store:
            raise PatternNotFound(
                f"pattern {name!r} does not exist; stored patterns: {', '.join(store.names()) or 'none'}",
                param="model" if suffix else "pattern",
            )
    return Resolved(UNION_SEPARATOR.join(names), "explicit")


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


def sampling_params(
    body: Any, prompt_tokens: int, limit: tuple[int | None, str], context_length: int | None, max_n: int
) -> SamplingParams:
    """The sampling parameters of a chat or completion body (`server.api.schemas.GenerationRequest`);
    `limit` is the body's token limit and the parameter that set it."""
    n = body.n or 1
    if n > max_n:
        raise InvalidRequest(f"n is at most {max_n}", param="n")
    limit, param = limit
    return SamplingParams(
        max_tokens=tokens_to_generate(context_length, prompt_tokens, limit, param),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stops,
        n=n,
        ignore_eos=body.ignore_eos,
    )


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's EOS and the model's `generation_config` ones."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return tuple(sorted(ids))
