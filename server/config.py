"""Configuration, declared once: every setting's default, range, help text and environment variable.

`ServerConfig` (pydantic-settings, prefix `TASKMOE_`) is the single source: `taskmoe serve`'s flags are
generated from its fields (`server.cli_settings`), `docs/serving.md`'s flag table is rendered from them, and
`RoutingPolicy` holds the routing settings that `taskmoe serve`, `taskmoe route` and the router share.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pattern_store.recipes import ROUTE_RULES

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

ENV_PREFIX = "TASKMOE_"
FULL_MODEL = "full"
"""`--fallback full`: serve queries that match no stored task with the unpruned model."""


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MiB', '2.5GB' or a plain byte count: the one parser of sizes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit such as 512MiB, 4GiB or 8GB")
    return int(float(match.group(1)) * _UNITS[unit])


def _optional_count(value: Any) -> Any:
    """'0', 'none' or '' mean no limit."""
    return None if str(value).strip().lower() in ("0", "none", "") else value


def _comma_list(value: Any) -> Any:
    """A list as the environment writes it: `a,b`; a flag repeated gives a list already."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


Bytes = Annotated[int, BeforeValidator(parse_bytes)]


@dataclass(frozen=True)
class Upstream:
    """A pattern whose requests another OpenAI-compatible server (vLLM, SGLang) answers."""

    pattern: str
    base_url: str  # ends with /v1
    model: str | None = None


def parse_upstreams(specs: tuple[str, ...] | list[str] | str) -> dict[str, Upstream]:
    """`["arith=http://gpu-7:8000/v1#my-arith", ...]` (or one comma-separated string, as in the environment)
    -> {pattern: Upstream}."""
    upstreams = {}
    for spec in _comma_list(specs):
        pattern, sep, rest = spec.strip().partition("=")
        url, _, model = rest.partition("#")
        if not sep or not pattern or not url.startswith(("http://", "https://")):
            raise ValueError(f"--upstream {spec!r}: expected PATTERN=http(s)://HOST:PORT/v1[#MODEL]")
        if pattern in upstreams:
            raise ValueError(f"--upstream: pattern {pattern!r} given twice")
        upstreams[pattern] = Upstream(pattern, url.rstrip("/"), model or None)
    return upstreams


class RoutingPolicy(BaseModel):
    """How a query becomes a pattern: shared by `taskmoe serve` (as `--route-*`), `taskmoe route` and the
    router itself, so that the three never disagree on a default."""

    model_config = ConfigDict(frozen=True)

    rule: Literal[ROUTE_RULES] = Field(  # type: ignore[valid-type]
        ROUTE_RULES[0], description="classifier (on the examples) or centroid (nearest pattern centroid)"
    )
    threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="calibrated probability a routed pattern (or union) must reach; below it, the fallback",
    )
    union: int = Field(
        2, ge=1, description="most patterns served together when none alone is probable enough; 1: no unions"
    )
    novelty: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="a query less typical of its pattern than this share of the pattern's held-out examples is of no "
        "stored task and gets the fallback; 0: never",
    )
    ngram_gate: float = Field(
        0.99,
        gt=0,
        le=1,
        description="calibrated probability at which the n-gram stage routes a typical query without embedding it "
        "(the embedding is most of a decision's time); 1: every query is embedded",
    )
    neighbours: int = Field(10, ge=1, description="nearest example prompts whose similarity a decision reports")


def _routing_field(name: str) -> Any:
    """A `RoutingPolicy` field, as a `--route-*` setting of the server (the same default, range and help)."""
    return RoutingPolicy.model_fields[name]


#: what `--expert-dtype` accepts: the checkpoint's precision, or a dtype (which must be the model's)
EXPERT_DTYPES = ("auto", "fp8", "mxfp4", "bfloat16", "float16", "float32")


class ServerConfig(BaseSettings):
    """`taskmoe serve`'s settings: flags (`--cache-budget 8GiB`) or environment (`TASKMOE_CACHE_BUDGET=8GiB`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True)

    model: Path = Field(description="model directory (safetensors)")
    store: Path | None = Field(None, description="pattern store directory (default: MODEL/patterns)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, gt=0, lt=65536, description="port")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    dtype: str = Field("auto", description="auto (the checkpoint's), bfloat16, float16 or float32")
    expert_dtype: str = Field(
        "auto",
        description="MoE expert pool: what a slot holds; auto (the checkpoint's: the values and scales of a "
        "block-FP8 or MXFP4 checkpoint, dequantized per step), fp8, mxfp4, or the model's dtype (dequantized when "
        "loaded)",
    )
    cache_budget: Bytes = Field(
        4 * 2**30,
        gt=0,
        description="bytes for routed experts (MoE: the expert pool's slots, allocated at start) or cached dense "
        "variants, beyond the shared backbone (4GiB, 512MiB, 8GB, ...)",
    )
    cache_wait: float = Field(
        30.0, ge=0, description="seconds a request waits for busy variants to free room before a 503"
    )
    expert_pool: bool = Field(
        True,
        description="MoE: true serves every pattern from one pool of expert slots, mixing patterns in one batch; "
        "false builds a separate model per variant",
    )
    route_rule: Literal[ROUTE_RULES] = _routing_field("rule")  # type: ignore[valid-type]
    route_threshold: float = _routing_field("threshold")
    route_union: int = _routing_field("union")
    route_novelty: float = _routing_field("novelty")
    route_ngram_gate: float = _routing_field("ngram_gate")
    store_poll: float = Field(
        2.0, ge=0, description="seconds between checks for patterns written by other processes; 0: never"
    )
    fallback: str = Field(
        FULL_MODEL, description="what serves unmatched queries: full (the whole model) or a pattern name"
    )
    upstream: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)] = Field(
        (),
        examples=["PATTERN=URL[#MODEL]"],
        description="PATTERN=URL[#MODEL]: serve PATTERN from another OpenAI-compatible server (vLLM, SGLang) at URL "
        "(its /v1 base); repeatable, or comma-separated in the environment",
    )
    api_key: str | None = Field(None, repr=False, description="require 'Authorization: Bearer KEY' on /v1 routes")
    admin_key: str | None = Field(None, repr=False, description="enable the /admin API, with this key")
    metrics_public: bool = Field(
        True, description="true: /metrics is open; false: it needs the API or admin key (its labels name the patterns)"
    )
    served_model_name: str | None = Field(
        None, description="the model id clients use (default: the model directory's name)"
    )
    max_batch: int = Field(
        32, ge=1, description="sequences decoded together; with the expert pool, of any patterns; 1: one at a time"
    )
    max_prefill_tokens: Annotated[int | None, BeforeValidator(_optional_count)] = Field(
        512,
        ge=1,
        description="prompts longer than this are prefilled in chunks of it between decode steps, so running streams "
        "keep their pace; 0 or none: whole prompts at once",
    )
    static_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="decode the expert pool's batch in a static KV cache, each step a CUDA graph replayed (auto: on "
        "a GPU; on: also on the CPU, run eagerly; models with linear-attention or sliding-window layers never do)",
    )
    static_cache_tokens: int = Field(
        4096,
        ge=16,
        description="columns of the static KV cache: requests whose prompt and max_tokens fit decode there, the "
        "others beside them in a growing cache; memory: max_batch x this x the model's KV bytes per token",
    )
    coverage_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="share of the expert pool's forward passes that also run the full routers, to measure each "
        "pattern's live coverage (the full router's gate mass on its kept experts), and of its requests whose "
        "generated tokens' probabilities are averaged (its confidence); 0: off, nothing extra runs",
    )
    coverage_tolerance: float = Field(
        0.05,
        gt=0,
        le=1,
        description="flag a pattern whose recent live coverage is this far below its calibrated coverage (of "
        "its answers' tokens, when it recorded them)",
    )
    record_fallback: int = Field(
        0,
        ge=0,
        description="keep the newest N routed queries that no pattern fit (sent to the fallback) in the store "
        "directory, for `taskmoe patterns suggest`: their embeddings and n-grams; 0: record nothing",
    )
    record_text: bool = Field(
        False, description="with --record-fallback: keep the queries' text too (prompts may be private)"
    )
    max_n: int = Field(16, ge=1, description="most choices (n) one request may ask for")
    max_request_bytes: Bytes = Field(
        8 * 2**20, ge=1024, description="request bodies larger than this get 413 before they are read"
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="threads that take requests and wait on their generations (default 64; with --max-batch 1 they "
        "run the generations: one per CPU core on the CPU, 8 on a GPU)",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker (default: 1 on the CPU, torch's default on a GPU)"
    )
    embedder: str | None = Field(None, description="sentence-transformers model directory (default all-MiniLM-L6-v2)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="json (one object per line) or text")

    @field_validator("expert_dtype")
    @classmethod
    def _known_expert_dtype(cls, value: str) -> str:
        if value not in EXPERT_DTYPES:
            raise ValueError(f"expected one of {', '.join(EXPERT_DTYPES)}, not {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _a_model_directory(cls, model: Path) -> Path:
        if not (model / "config.json").is_file():
            raise ValueError(f"{model}: not a model directory (no config.json)")
        return model

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if self.store is None:
            object.__setattr__(self, "store", self.model / "patterns")
        if not self.metrics_public and not (self.api_key or self.admin_key):
            raise ValueError("--metrics-public false needs an --api-key or --admin-key to read /metrics with")
        parse_upstreams(self.upstream)  # raises on a malformed spec
        if "@" in self.served_name:
            raise ValueError(f"model name {self.served_name!r} must not contain '@'")
        return self

    @functools.cached_property
    def upstream_map(self) -> dict[str, Upstream]:
        """`--upstream` specs, parsed: pattern -> the server that answers it."""
        return parse_upstreams(self.upstream)

    @property
    def routing(self) -> RoutingPolicy:
        return RoutingPolicy(
            rule=self.route_rule,
            threshold=self.route_threshold,
            union=self.route_union,
            novelty=self.route_novelty,
            ngram_gate=self.route_ngram_gate,
        )

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model.resolve().name

    @property
    def fallback_pattern(self) -> str | None:
        """None when the fallback is the full model."""
        return None if self.fallback == FULL_MODEL else self.fallback

    def worker_count(self, device_type: str) -> int:
        """Threads that lease variants and wait for (or, without batching, run) generations. With batching
        they mostly wait: 64. Without, one per CPU core: more only contend for the interpreter and the
        cores (`scripts/bench_server.py` shows it); on a GPU 8, whose kernels the device overlaps."""
        if self.workers is not None:
            return self.workers
        if self.max_batch > 1:
            return 64
        return max(2, os.cpu_count() or 2) if device_type == "cpu" else 8


def flag(name: str) -> str:
    """The command-line flag of setting `name`."""
    return "--" + name.replace("_", "-")


def env_variable(name: str) -> str:
    """The environment variable of setting `name`."""
    return ENV_PREFIX + name.upper()


def format_bytes(size: int) -> str:
    """A byte count as a size flag would write it: exact binary units where they fit (4GiB, 8MiB)."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def shown_default(field: Any) -> str | None:
    """A setting's default as its flag would take it (None: no default worth showing)."""
    default = field.default
    if default is None or default == () or field.is_required():
        return None
    if any(getattr(meta, "func", None) is parse_bytes for meta in field.metadata):
        return format_bytes(default)
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def settings_rows(model: type[BaseModel] = ServerConfig) -> list[tuple[str, str, str, str]]:
    """(flag, environment variable, default, meaning) of every setting: the docs' flag table."""
    return [
        (flag(name), env_variable(name), shown_default(field) or "", field.description or "")
        for name, field in model.model_fields.items()
    ]


class ConfigError(ValueError):
    """Settings that cannot serve, explained in terms of flags and environment variables."""


def load_config(**given: Any) -> ServerConfig:
    """`ServerConfig` from the given settings (flags) over the environment over the defaults; a
    `ConfigError` that names each bad flag and its variable instead of pydantic's report."""
    try:
        return ServerConfig(**given)
    except ValidationError as error:
        raise ConfigError(explain(error, ServerConfig, with_variables=True)) from None


def explain(error: ValidationError, model: type[BaseModel], with_variables: bool = False) -> str:
    """Pydantic's report, in the words of the command line: each bad flag (and its variable), what is wrong,
    and what the setting is."""
    problems = []
    for detail in error.errors():
        where = str(detail["loc"][0]) if detail["loc"] else ""
        message = "required" if detail["type"] == "missing" else str(detail["msg"]).removeprefix("Value error, ")
        if not where:
            problems.append(message)
            continue
        field = model.model_fields.get(where)
        meaning = f" ({field.description})" if field is not None and field.description else ""
        variable = f" ({env_variable(where)})" if with_variables else ""
        problems.append(f"{flag(where)}{variable}: {message}{meaning}")
    return "; ".join(problems)
