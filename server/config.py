"""Server configuration: one frozen dataclass, filled from `taskmoe serve` flags or `TASKMOE_*` variables."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

ENV_PREFIX = "TASKMOE_"
FULL_MODEL = "full"
"""`--fallback full`: serve queries that match no stored task with the unpruned model."""


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MiB', '2.5GB' or a plain byte count."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit such as 512MiB, 4GiB or 8GB")
    return int(float(match.group(1)) * _UNITS[unit])


def env_default(name: str, default: str | None = None) -> str | None:
    """The value of `TASKMOE_<NAME>` (flag names with '-' as '_'), or `default`."""
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


@dataclass(frozen=True)
class Upstream:
    """A pattern whose requests another OpenAI-compatible server (vLLM, SGLang) answers."""

    pattern: str
    base_url: str  # ends with /v1
    model: str | None = None


def parse_upstreams(specs: list[str] | tuple[str, ...] | str | None) -> dict[str, Upstream]:
    """`["arith=http://gpu-7:8000/v1#my-arith", ...]` (or one comma-separated string, as in the
    environment) -> {pattern: Upstream}."""
    if not specs:
        return {}
    if isinstance(specs, str):
        specs = [part for part in specs.split(",") if part.strip()]
    upstreams = {}
    for spec in specs:
        pattern, sep, rest = spec.strip().partition("=")
        url, _, model = rest.partition("#")
        if not sep or not pattern or not url.startswith(("http://", "https://")):
            raise ValueError(f"--upstream {spec!r}: expected PATTERN=http(s)://HOST:PORT/v1[#MODEL]")
        if pattern in upstreams:
            raise ValueError(f"--upstream: pattern {pattern!r} given twice")
        upstreams[pattern] = Upstream(pattern, url.rstrip("/"), model or None)
    return upstreams


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    store: Path
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    cache_budget: int = 4 * 2**30
    cache_wait: float = 30.0  # seconds a request waits for variants in use to free room before 503
    route_threshold: float = 0.9  # calibrated probability a route must reach (one pattern, or a union)
    route_rule: str = "classifier"
    route_union: int = 2  # most patterns a union of close candidates may have; 1: no unions
    route_novelty: float = 0.02  # typicality below which a query is of no stored task (out-of-store)
    store_poll: float = 2.0  # seconds between checks of the store for other processes' writes; 0: never
    fallback: str = FULL_MODEL  # "full" or a pattern name
    api_key: str | None = None
    admin_key: str | None = None
    model_name: str | None = None  # the id clients use; default: the model directory's name
    workers: int | None = None  # threads that build variants and generate; None: see `worker_count`
    max_batch: int = 32  # sequences decoded together per model; 1: one request at a time
    max_prefill_tokens: int | None = 512  # longer prompts are prefilled in chunks between decode steps
    expert_pool: bool = True  # MoE: one pool of expert slots, variants as masks; False: a model per variant
    torch_threads: int | None = None  # intra-op threads; None: 1 on the CPU (see Service), torch's default on GPU
    embedder: str | None = None  # a local sentence-transformers model; default: all-MiniLM-L6-v2
    max_n: int = 16
    metrics_public: bool = True  # False: /metrics needs the API or admin key (it names the patterns)
    max_request_bytes: int = 8 * 2**20  # larger bodies get 413 before anything reads them
    upstreams: tuple[str, ...] = ()  # "PATTERN=URL[#MODEL]": that pattern's requests go to another server

    @functools.cached_property
    def upstream_map(self) -> dict[str, Upstream]:
        """`--upstream` specs, parsed once: pattern -> the server that answers it."""
        return parse_upstreams(self.upstreams)

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.resolve().name

    def worker_count(self, device_type: str) -> int:
        """Threads that lease variants and wait for (or, without batching, run) generations. With batching
        they mostly wait: 64. Without, one per CPU core: more only contend for the interpreter and the
        cores (`scripts/bench_server.py` shows it); on a GPU 8, whose kernels the device overlaps."""
        if self.workers is not None:
            return self.workers
        if self.max_batch > 1:
            return 64
        return max(2, os.cpu_count() or 2) if device_type == "cpu" else 8

    @property
    def fallback_pattern(self) -> str | None:
        """None when the fallback is the full model."""
        return None if self.fallback == FULL_MODEL else self.fallback

    def validate(self) -> ServerConfig:
        if not (self.model / "config.json").is_file():
            raise ValueError(f"--model {self.model}: not a model directory (no config.json)")
        if self.cache_budget <= 0:
            raise ValueError("--cache-budget must be positive")
        if self.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
        if not self.metrics_public and not (self.api_key or self.admin_key):
            raise ValueError("--metrics-public false needs an --api-key or --admin-key to read /metrics with")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError("--max-prefill-tokens must be at least 1 (0 or none: whole prompts)")
        if self.max_request_bytes < 1024:
            raise ValueError("--max-request-bytes must be at least 1KiB")
        if not 0 < self.route_threshold <= 1:
            raise ValueError(f"--route-threshold is a probability in (0, 1], got {self.route_threshold}")
        if self.route_union < 1:
            raise ValueError("--route-union must be at least 1 (1: never serve a union)")
        if not 0 <= self.route_novelty < 1:
            raise ValueError(f"--route-novelty is a share in [0, 1), got {self.route_novelty}")
        if self.store_poll < 0:
            raise ValueError("--store-poll must not be negative (0: do not follow the store)")
        if self.cache_wait < 0:
            raise ValueError("--cache-wait must not be negative")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("--torch-threads must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} is not a TCP port")
        _ = self.upstream_map  # raises on a malformed spec
        if "@" in self.served_name:
            raise ValueError(f"model name {self.served_name!r} must not contain '@'")
        return self
