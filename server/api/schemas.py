"""Request bodies at the HTTP boundary, as the OpenAI API defines them (fields the server honours), plus
the admin API's. Unknown fields are accepted and ignored (OpenAI adds fields often; clients send them);
known fields that would change the answer and that the server cannot honour are refused in `unsupported`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.errors import APIError
from server.plan import Ask, Sampling


def _text(value: Any) -> Any:
    """Strings from JSON may hold lone surrogates (`"\\ud800"`), which no tokenizer can encode."""
    strings = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for item in strings:
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    pattern: str | None = Field(default=None, description="taskmoe: serve with this stored pattern")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate max_tokens tokens")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        _text(value)
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(stop == "" for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def _sampling(self, limit: tuple[int | None, str]) -> Sampling:
        return Sampling(
            max_tokens=limit[0],
            limit_param=limit[1],
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.n,
            seed=self.seed,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
        )

    def _ask(self, **fields: Any) -> Ask:
        """The request as the serving code takes it (refusing what it cannot honour first)."""
        self.unsupported()
        return Ask(
            model=self.model,
            pattern=self.pattern,
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            **fields,
        )

    def ask(self) -> Ask:
        """The request as the serving code takes it (each kind of completion says how)."""
        raise NotImplementedError

    def unsupported(self) -> None:
        """Refuse what would silently change the answer; ignore the rest."""
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported", param="presence_penalty")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    _valid_text = field_validator("text")(classmethod(lambda cls, value: _text(value)))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    _valid_content = field_validator("content")(classmethod(lambda cls, value: _text(value)))

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"messages[{index}]: only text content is supported, not {part.type!r}",
                    param=f"messages.{index}.content",
                )
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs or self.top_logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.tools:
            raise APIError(400, "tools (function calling) are not supported", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice is not supported", param="tool_choice")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "only the 'text' response_format is supported", param="response_format")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree", param="max_completion_tokens")

    @property
    def token_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def ask(self) -> Ask:
        conversation = tuple(self.conversation())
        return self._ask(
            kind="chat", sampling=self._sampling(self.token_limit), messages=conversation, query=self.query()
        )

    def query(self) -> str:
        """What routing looks at: the last user message (the task at hand)."""
        conversation = self.conversation()
        users = [m["content"] for m in conversation if m["role"] == "user"]
        return users[-1] if users else conversation[-1]["content"]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        _text(value)
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def ask(self) -> Ask:
        sampling = self._sampling((self.max_tokens, "max_tokens"))
        return self._ask(kind="text", sampling=sampling, prompts=tuple(self.prompts), query=self.prompts[0])

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")


class RouteRequest(BaseModel):
    """`POST /v1/route`: a chat body, a completion body, or just `{"input": "..."}`."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    pattern: str | None = None
    input: str | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = None

    _valid_text = field_validator("input", "prompt")(classmethod(lambda cls, value: _text(value)))

    def query(self) -> str:
        if self.messages:
            return ChatCompletionRequest(model="-", messages=self.messages).query()
        if self.prompt is not None:
            if isinstance(self.prompt, list) and not self.prompt:
                raise APIError(400, "prompt is an empty list: give at least one prompt", param="prompt")
            return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if self.input is not None:
            return self.input
        raise APIError(400, "give messages, prompt or input", param="input")


# -- admin -----------------------------------------------------------------------------------------


class CalibrationPrompt(BaseModel):
    prompt: str = Field(min_length=1)
    response: str | None = None


class RegisterPatternRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    prompts: list[str | CalibrationPrompt] = Field(min_length=1, max_length=10_000)
    examples: list[str] | None = Field(
        default=None, max_length=10_000, description="what routing matches; default: the prompts"
    )
    method: str | None = Field(default=None, description="scoring method (default: reap for MoE, seap for dense)")
    budget: Literal["uniform", "adaptive", "loss"] = Field(
        default="uniform", description="MoE: kept experts per layer ('loss' moves them by answer loss: refine 'e2e')"
    )
    refine: Literal["none", "local", "e2e"] = Field(
        default="none", description="MoE: swap experts by layer-local error (local) or by answer loss (e2e)"
    )
    substitute: Literal["none", "novice", "low-rank"] = Field(
        default="none",
        description="MoE: what a pruned expert's choice gets: nothing (none), its novice, its mean output on "
        "the calibration tokens routed to it (novice), or the novice plus a low-rank linear map of the token "
        "(low-rank)",
    )
    substitute_rank: int | None = Field(default=None, ge=1, le=1024, description="low-rank: the map's rank (16)")
    keep: float | str | None = Field(
        default=None,
        description="MoE: share of experts kept per layer, or 'auto': the fewest experts whose answers to held-out "
        "calibration prompts match the full model's `target` share of the time",
    )
    target: float | None = Field(default=None, gt=0, le=1, description="keep 'auto': default 0.99")
    keep_experts: int | None = Field(default=None, ge=1)
    sparsity: float = Field(default=0.2, ge=0, lt=1)
    threshold: float = Field(default=0.0, ge=0, lt=1)
    replace: bool = False


class CalibrateSuggestionRequest(BaseModel):
    """`POST /admin/suggestions/{cluster}/calibrate`: the new pattern's name, as the suggestions were listed."""

    model_config = ConfigDict(extra="forbid")

    name: str
    replace: bool = Field(default=False, description="overwrite a pattern of that name")
    min_size: int = Field(default=5, ge=2, le=10_000, description="as in GET /admin/suggestions?min_size=")
    refine: Literal["none", "local", "e2e"] | None = Field(
        default=None,
        description="MoE: the refinement (default e2e: the full model answers the prompts anyway, and answer-loss "
        "refinement closes most of the gap to a pattern calibrated on true answers; dense models: none)",
    )
