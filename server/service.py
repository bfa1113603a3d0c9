"""What the server does, without HTTP: choose a pattern, lease its variant, tokenize, manage patterns.

One `Service` per app (made in its lifespan). Every method here may block (routing embeds, leasing may
build a variant, calibration runs for a while), so the API calls them from worker threads.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from pattern_store.embedder import Embedder
from pattern_store.pattern import PatternError, PatternExistsError, pattern_from_bundle, validate_name
from pattern_store.selection import Selection, SelectionError, union
from pattern_store.store import PatternStore
from server.batching import BatchedDecoder, batchable
from server.cache import CacheFull, Variant, VariantBuildFailed, VariantCache, VariantKey
from server.config import FULL_MODEL, ServerConfig
from server.errors import (
    ContextTooLong,
    InvalidPattern,
    InvalidRequest,
    JobInProgress,
    LoadFailed,
    NoRoom,
    PatternExists,
    PatternInUse,
    PatternNotFound,
    PatternUnusable,
    TooManyJobs,
)
from server.expert_pool import ExpertPool, PoolLease
from server.jobs import Job, JobRefused, JobRunner
from server.metrics import Metrics
from server.model.checkpoint import model_fingerprint
from server.model.pooled import PooledModel, RowRoute
from server.model.pruning import keep_count
from server.model.variant import VariantBuilder
from server.patterns import CalibrationText, PatternRecipe, load_tokenizer, make_pattern
from server.request_path import (
    Resolved,
    character_limit,
    chat_prompt_ids,
    eos_ids,
    explicit_choice,
    model_ids,
)
from server.routing import UNION_SEPARATOR, Router
from server.store_watch import StoreWatcher

log = logging.getLogger("taskmoe.service")

MAX_CHOICES = 128
"""Prompts x n in one request."""

MAX_ROUTED_CHARACTERS = 16_384
"""Routing embeds the start of a query only: its embedder truncates at a few hundred tokens anyway."""

Lease = Variant | PoolLease
"""What serves a request: a cached variant (dense models, or MoE without the pool) or a pool lease."""


def pool_slots(builder: VariantBuilder, budget: int) -> int:
    """Expert slots per sparse layer that `budget` bytes pay for (one slot costs one expert in every layer),
    at most the experts a layer has; a budget that cannot hold one top-k routing is an error."""
    per_slot = sum(builder.expert_bytes(index) for index in builder.sparse_layers)
    most = max(layer.num_experts for layer in builder.sparse_layers.values())
    slots = min(budget // per_slot, most)
    top_k = int(builder.config.num_experts_per_tok)
    if slots < top_k:
        raise ValueError(
            f"--cache-budget {budget} bytes holds {slots} experts per layer; routing needs at least {top_k} "
            f"({top_k * per_slot} bytes)"
        )
    return int(slots)


class Service:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.builder = VariantBuilder(config.model, device=config.device, dtype=config.dtype)
        self.torch_threads = self._set_torch_threads(config.torch_threads)
        self.tokenizer = load_tokenizer(config.model)
        self.fingerprint = model_fingerprint(config.model)
        self.store = PatternStore(config.store, create=True)
        for file, problem in sorted(self.store.problems.items()):
            log.warning("pattern store: skipping %s: %s", file, problem)
        self.embedder = Embedder(config.embedder) if config.embedder else Embedder()
        fallback = config.fallback_pattern
        if fallback is not None and fallback not in self.store:
            raise ValueError(f"--fallback {fallback}: no such pattern in {config.store}; stored: {self.store.names()}")
        for pattern in config.upstream_map:
            if pattern not in self.store:
                raise ValueError(f"--upstream {pattern}=...: no such pattern in {config.store} (routing needs it)")
        self.router = Router(
            self.store,
            self.embedder,
            rule=config.route_rule,
            threshold=config.route_threshold,
            fallback=fallback,
            union=config.route_union,
            novelty=config.route_novelty,
        )
        self.router.learn()  # at start, not on the first request
        self.cache = VariantCache(config.cache_budget, self.metrics.cache_listener(), wait=config.cache_wait)
        self.pool: ExpertPool | None = None
        if config.expert_pool and self.builder.family.kind == "moe":
            pooled = PooledModel(self.builder, pool_slots(self.builder, config.cache_budget))
            self.pool = ExpertPool(pooled, self.metrics.pool_listener(), wait=config.cache_wait)
            self.metrics.watch_pool(self.pool)
            self.metrics.backbone.set(self.builder.backbone_bytes)
        self._routes: dict[VariantKey, RowRoute] = {}
        self._unions: set[str] = set()  # union labels leased so far: forgotten with any of their patterns
        self._unions_lock = threading.Lock()
        self._pool_decoder: BatchedDecoder | None = None
        self.jobs = JobRunner(on_error=lambda job, trace: log.error("job %s failed:\n%s", job.id, trace))
        self.context_length = int(getattr(self.builder.config, "max_position_embeddings", 0) or 0) or None
        self.eos_ids = eos_ids(self.tokenizer, self.builder.generation_config)
        self._calibration_lock = threading.Lock()
        self._decoder_lock = threading.Lock()
        self.metrics.budget.set(config.cache_budget)
        self.watcher: StoreWatcher | None = None
        if config.store_poll > 0:
            self.watcher = StoreWatcher(self.store, config.store_poll, self._store_changed)
            self.watcher.start()

    def _set_torch_threads(self, requested: int | None) -> int:
        """On the CPU, each worker thread that runs torch gets its own OpenMP team; several teams on a few
        cores spin against each other (`scripts/bench_server.py` measures it). One intra-op thread per
        worker, with concurrency across requests, is the default there."""
        if requested is None and self.builder.device.type == "cpu":
            requested = 1
        if requested is not None:
            torch.set_num_threads(requested)
        return torch.get_num_threads()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.jobs.shutdown()

    def _store_changed(self, before: dict[str, str], after: dict[str, str]) -> None:
        """Another process (or this one) wrote the store: a removed or replaced pattern's variants, and every
        union with it, never serve again; routing learns the new store now rather than on a request."""
        for name, revision in before.items():
            if after.get(name) != revision:
                self._forget(name)
        self.router.learn()

    # -- names ---------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.config.served_name

    def model_ids(self) -> list[str]:
        return model_ids(self.model_name, self.store.names())

    # -- choosing the pattern ------------------------------------------------------------------

    def resolve(self, model: str, pattern: str | None, query: str) -> Resolved:
        """An explicit pattern (`MODEL@PATTERN` or the `pattern` field) or, without one, a routed one."""
        return explicit_choice(model, pattern, self.model_name, self.store) or self.route(query)

    def route(self, query: str) -> Resolved:
        with self.metrics.route_seconds.time():
            # the embedder reads a few hundred tokens; tokenizing megabytes to throw them away is a DoS
            decision = self.router.route(query[:MAX_ROUTED_CHARACTERS])
        resolved = Resolved(decision.pattern, decision.reason, decision.probability, decision)
        self.metrics.routes.labels(resolved.label, decision.reason).inc()
        return resolved

    # -- variants ------------------------------------------------------------------------------

    def _document(self, name: str) -> dict[str, Any]:
        """A pattern's JSON document (its tensors, scores and example embeddings, are not needed to serve it),
        checked to belong to this model."""
        try:
            document = self.store.summary(name)
        except KeyError:
            raise PatternNotFound(f"pattern {name!r} does not exist") from None
        if document.get("model_fingerprint") != self.fingerprint:
            raise PatternUnusable(
                f"pattern {name!r} was calibrated on another model ({str(document.get('model_fingerprint'))[:12]}, "
                f"this one is {self.fingerprint[:12]}); calibrate it again for this model"
            )
        return document

    def acquire(self, pattern: str | None) -> Lease:
        """What serves `pattern` (`a`, a union `a+b`, None: the full model), pinned until `release`: with the
        expert pool a lease on its experts (loading the missing ones), otherwise its cached variant (built if
        missing). A hit reads only the patterns' revisions; their selections are parsed only the first time
        that revision is served. A union keeps what any of its patterns keeps."""
        names = tuple(pattern.split(UNION_SEPARATOR)) if pattern else ()
        documents = [self._document(name) for name in names]
        key = VariantKey(pattern, UNION_SEPARATOR.join(str(document["tensors"]) for document in documents))
        if len(names) > 1:
            with self._unions_lock:
                self._unions.add(key.label)

        @functools.cache
        def selection() -> Selection | None:
            if not documents:
                return None
            return union([Selection.from_json(document["selection"]) for document in documents])

        if self.pool is not None:
            return self._lease_experts(key, selection)

        def build() -> Any:
            model = self.builder.build(selection())
            self.metrics.backbone.set(self.builder.backbone_bytes)
            return model

        with self._lease_errors(pattern):
            return self.cache.acquire(key, lambda: self.builder.variant_bytes(selection()), build)

    @contextmanager
    def _lease_errors(self, pattern: str | None) -> Iterator[None]:
        """The domain errors of leasing a pattern's variant or experts."""
        try:
            yield
        except (SelectionError, PatternError) as error:
            raise PatternUnusable(f"pattern {pattern!r} does not fit this model: {error}") from None
        except CacheFull as error:
            self.metrics.cache_refusals.inc()
            raise NoRoom(str(error), retry_after=error.retry_after) from None
        except VariantBuildFailed as error:
            log.error("%s", error, exc_info=error.__cause__)
            raise LoadFailed(str(error)) from None

    def _lease_experts(self, key: VariantKey, selection: Callable[[], Selection | None]) -> PoolLease:
        assert self.pool is not None
        with self._lease_errors(key.pattern):
            route = self._routes.get(key)
            if route is None:
                route = RowRoute(key.label, self.builder.kept_experts(selection()))
                if len(self._routes) >= 1024:  # revisions of replaced patterns pile up otherwise
                    self._routes.clear()
                self._routes[key] = route
            return self.pool.acquire(key, route)

    def release(self, variant: Lease) -> None:
        if isinstance(variant, PoolLease):
            assert self.pool is not None
            self.pool.release(variant)
        else:
            self.cache.release(variant)

    def decoder(self, variant: Lease) -> BatchedDecoder | None:
        """The batched decoder that serves `variant` (None: decode one request at a time): with the pool one
        for every pattern, otherwise one per variant."""
        if self.config.max_batch <= 1 or not batchable(variant.model):
            return None
        with self._decoder_lock:
            if isinstance(variant, PoolLease):
                if self._pool_decoder is None:
                    pooled = variant.model.pooled
                    self._pool_decoder = BatchedDecoder(
                        pooled.model,
                        self.config.max_batch,
                        pooled=pooled,
                        max_prefill_tokens=self.config.max_prefill_tokens,
                    )
                return self._pool_decoder
            if variant.decoder is None:
                variant.decoder = BatchedDecoder(
                    variant.model, self.config.max_batch, max_prefill_tokens=self.config.max_prefill_tokens
                )
            return variant.decoder

    @staticmethod
    def route_of(variant: Lease) -> RowRoute | None:
        """How a lease's rows route in the shared batch (None: a variant of its own)."""
        return variant.route if isinstance(variant, PoolLease) else None

    @contextmanager
    def lease(self, pattern: str | None) -> Iterator[Lease]:
        variant = self.acquire(pattern)
        try:
            yield variant
        finally:
            self.release(variant)

    # -- prompts -------------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, self.context_length)

    def text_prompts_ids(self, texts: Sequence[str], n: int) -> list[list[int]]:
        """Token ids of a batch of text prompts; refuses batches and prompts that could never fit before
        spending time on them."""
        if len(texts) * n > MAX_CHOICES:
            raise InvalidRequest(f"at most {MAX_CHOICES} choices per request (prompts x n)", param="prompt")
        limit = self._character_limit()
        for text in texts:
            if len(text) > limit:
                raise ContextTooLong(
                    f"a prompt of {len(text)} characters cannot fit this model's context of "
                    f"{self.context_length} tokens",
                    param="prompt",
                )
        return [list(self.tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]

    def _character_limit(self) -> int:
        return character_limit(self.context_length)

    # -- managing patterns ---------------------------------------------------------------------

    def pattern_summary(self, name: str) -> dict[str, Any]:
        try:
            summary = self.store.summary(name)
        except KeyError:
            raise PatternNotFound(f"pattern {name!r} does not exist") from None
        summary.pop("tensors", None)
        summary["id"] = f"{self.model_name}@{name}"
        return summary

    def register(
        self, name: str, texts: Sequence[CalibrationText], examples: Sequence[str], recipe: PatternRecipe, replace: bool
    ) -> Job:
        """Start calibrating a pattern; it is routable as soon as the job succeeds."""
        self._check_new_name(name)
        self._check_calibration_input(texts, examples, recipe)
        if recipe.refine == "e2e":
            # the answer-loss refinement holds the whole model beside the cached variants: only when it fits
            whole = self.builder.variant_bytes(None)
            if whole > self.config.cache_budget:
                raise InvalidRequest(
                    f"refine 'e2e' holds the whole model ({whole / 2**30:.2f} GiB of experts) in this server's memory, "
                    f"more than its cache budget ({self.config.cache_budget / 2**30:.2f} GiB); use refine 'local' "
                    "(any model size), or run 'taskmoe calibrate --refine e2e' where the model fits and import it",
                    param="refine",
                )
        if name in self.store and not replace:
            raise PatternExists(f"pattern {name!r} exists; send replace=true to recalibrate it")
        stages = ["statistics", *(["layer-local refinement"] if recipe.refine != "none" else [])]
        stages += ["answer-loss refinement"] if recipe.refine == "e2e" else []

        def calibrate(progress: Any) -> dict[str, Any]:
            def staged(stage: str, done: int, total: int | None) -> None:
                # each stage an equal share of the bar; a stage of unknown length creeps towards its end
                share = done / total if total else 1 - 1 / (1 + done / 50)
                progress((stages.index(stage) + min(share, 1.0)) / len(stages) if stage in stages else 0.0)

            with self._calibration_lock:
                pattern, _ = make_pattern(
                    name, self.builder, self.tokenizer, texts, recipe, examples, self.embedder, self.fingerprint, staged
                )
                self.store.add(pattern, replace=replace)
                self._forget(name)  # a replaced pattern's old variant must not serve again
            return self.pattern_summary(name)

        try:
            return self.jobs.submit(
                "calibrate", f"calibrate pattern {name!r} from {len(texts)} prompts", calibrate, subject=name
            )
        except JobRefused as refused:
            if refused.busy:
                raise JobInProgress(str(refused), param="name") from None
            raise TooManyJobs(str(refused), retry_after=30) from None

    def _check_calibration_input(
        self, texts: Sequence[CalibrationText], examples: Sequence[str], recipe: PatternRecipe
    ) -> None:
        """Everything about a calibration job that can be checked before it is queued (so that a 202 means
        the job can run): text a tokenizer can take, prompts that fit the context, a keep the model allows."""
        limit = self._character_limit()
        for param, values in (
            ("prompts", [t.prompt for t in texts] + [t.response or "" for t in texts]),
            ("examples", list(examples)),
        ):
            for text in values:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest(
                        f"{param} must be valid Unicode text (a lone surrogate?)", param=param
                    ) from None
                if len(text) > limit:
                    raise InvalidRequest(
                        f"a text in {param} of {len(text)} characters cannot fit the model's context", param=param
                    )
        if self.builder.family.kind != "moe":
            return
        top_k = int(self.builder.config.num_experts_per_tok)
        experts = min(layer.num_experts for layer in self.builder.sparse_layers.values())
        param = "keep_experts" if recipe.keep_experts is not None else "keep"
        try:
            keep_count(experts, top_k, recipe.keep_ratio, recipe.keep_experts)
        except ValueError as error:
            raise InvalidRequest(f"{param}: {error}", param=param) from None

    def _check_new_name(self, name: str) -> None:
        try:
            validate_name(name)
        except PatternError as error:
            raise InvalidRequest(str(error), param="name") from None
        if name == FULL_MODEL:
            raise InvalidRequest(f"{FULL_MODEL!r} is reserved: it names the full model", param="name")

    def import_bundle(self, data: bytes, replace: bool) -> dict[str, Any]:
        try:
            pattern = pattern_from_bundle(data)
            pattern.check_model(self.fingerprint)
        except PatternError as error:
            raise InvalidPattern(str(error)) from None
        self._check_new_name(pattern.name)
        if pattern.example_embeddings is None or not pattern.examples:
            raise InvalidRequest(f"pattern {pattern.name!r} has no example prompts: routing could never choose it")
        try:
            self.builder.variant_bytes(pattern.selection)  # checks the selection against this model
            self.store.add(pattern, replace=replace)
        except SelectionError as error:
            raise InvalidRequest(f"pattern {pattern.name!r} does not fit this model: {error}") from None
        except PatternExistsError as error:
            raise PatternExists(str(error)) from None
        except PatternError as error:
            raise InvalidPattern(str(error)) from None
        self._forget(pattern.name)
        return self.pattern_summary(pattern.name)

    def delete(self, name: str) -> None:
        if name == self.config.fallback_pattern:
            raise PatternInUse(f"pattern {name!r} is the --fallback; unmatched queries need it")
        if name in self.config.upstream_map:
            raise PatternInUse(f"pattern {name!r} is served by an --upstream; routing needs it")
        try:
            self.store.remove(name)
        except KeyError:
            raise PatternNotFound(f"pattern {name!r} does not exist") from None
        self._forget(name)

    def warm(self, name: str) -> dict[str, Any]:
        with self.lease(None if name == FULL_MODEL else name) as variant:
            warmed = {"pattern": variant.key.label, "bytes": variant.nbytes, "build_seconds": variant.build_seconds}
            if isinstance(variant, PoolLease):
                warmed["loaded_experts"] = variant.loaded
            return warmed

    def evict(self, name: str) -> int | None:
        """Drop a pattern's variant; with the pool, free the slots of its experts that nothing pins (0 when
        all of them are in use). None: nothing of that pattern is cached."""
        if self.pool is not None:
            return self.pool.evict(name)
        return self.cache.evict(None if name == FULL_MODEL else name) or None

    def _forget(self, name: str) -> None:
        """A pattern was replaced or removed: its old revision, alone or in a union, must never serve again
        (new revisions have new keys; this frees the old ones now rather than when they age out)."""
        with self._unions_lock:
            unions = {label for label in self._unions if name in label.split(UNION_SEPARATOR)}
            self._unions -= unions
        for label in (name, *sorted(unions)):
            self.cache.evict(label)
            if self.pool is not None:
                self.pool.forget(label)

    def cache_report(self) -> dict[str, Any]:
        """What `GET /admin/cache` shows: the pool's occupancy and per pattern its resident experts, or the
        cached variants."""
        report: dict[str, Any] = {
            "object": "cache",
            "budget_bytes": self.config.cache_budget,
            "backbone_bytes": self.builder.backbone_bytes,
        }
        if self.pool is None:
            report |= {
                "resident_bytes": self.cache.resident_bytes,
                "evictions": self.cache.evictions,
                "data": self.cache.snapshot(),
            }
            return report
        pool = self.pool.snapshot()
        report |= {
            "resident_bytes": pool["resident_bytes"],
            "evictions": pool["evicted_experts"],
            "data": pool.pop("patterns"),
            "pool": pool,
        }
        return report
