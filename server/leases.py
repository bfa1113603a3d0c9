"""What serves a request, pinned while it runs: a `Lease` from one of two lease managers.

- `PoolLeases` (MoE models): one expert pool; a lease pins the experts of the request's patterns (loading
  the missing ones), its model routes the request's rows as their variant, and every pattern shares one
  batched decoder.
- `VariantLeases` (dense models, or MoE with `--expert-pool false`): a cache of built variants under a byte
  budget; a lease pins one variant, and each variant has its own decoder.

Both read a choice's patterns at their current revision (a replaced pattern never serves its old
selection), refuse a pattern calibrated on another model, and wait for room first come first served
(`server.admission`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pattern_store.coverage import reference_coverage
from pattern_store.pattern import PatternError, model_mismatch
from pattern_store.selection import Selection, SelectionError, union
from pattern_store.store import PatternStore
from server.batching import BatchedDecoder, batchable
from server.cache import Variant, VariantCache, VariantKey
from server.config import FULL_MODEL, ServerConfig
from server.errors import LoadFailed, NoRoom, PatternNotFound, PatternUnusable
from server.expert_pool import ExpertPool, PoolLease
from server.metrics import Metrics
from server.model.checkpoint import model_identity
from server.model.coverage_meter import CoverageMeter
from server.model.pooled import PooledModel, RowRoute, pool_expert_format, slot_expert_bytes
from server.model.quantized_slots import SlotFormat
from server.model.variant import VariantBuilder
from server.resolver import Choice, check_stored
from server.routing import UNION_SEPARATOR
from server.static_rows import static_decodable

log = logging.getLogger("taskmoe.leases")


class Lease(Protocol):
    """One request's hold on what serves it; `release()` ends it (once)."""

    label: str
    model: Any
    route: RowRoute | None  # how the lease's rows route in a shared batch (None: a variant of its own)
    decoder: BatchedDecoder | None  # None: decode one request at a time

    def release(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class LeaseManager(Protocol):
    """Leases for one model, and what the admin API asks of them."""

    def acquire(self, choice: Choice) -> Lease: ...

    def forget(self, name: str) -> None: ...

    def evict(self, label: str) -> int | None: ...

    def report(self) -> dict[str, Any]: ...

    def coverage(self, label: str) -> dict[str, Any] | None:
        """The live coverage of the pattern `label` (None: not sampled, or not measured by this manager)."""
        ...


@dataclass
class _PooledLease:
    lease: PoolLease
    decoder: BatchedDecoder | None
    _pool: ExpertPool
    _released: bool = False

    @property
    def label(self) -> str:
        return self.lease.key.label

    @property
    def model(self) -> Any:
        return self.lease.model

    @property
    def route(self) -> RowRoute:
        return self.lease.route

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self.lease)

    def describe(self) -> dict[str, Any]:
        lease = self.lease
        return {
            "pattern": self.label,
            "bytes": lease.nbytes,
            "build_seconds": lease.build_seconds,
            "loaded_experts": lease.loaded,
        }


@dataclass
class _CachedLease:
    variant: Variant
    decoder: BatchedDecoder | None
    _cache: VariantCache
    route: None = None
    _released: bool = False

    @property
    def label(self) -> str:
        return self.variant.key.label

    @property
    def model(self) -> Any:
        return self.variant.model

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache.release(self.variant)

    def describe(self) -> dict[str, Any]:
        return {"pattern": self.label, "bytes": self.variant.nbytes, "build_seconds": self.variant.build_seconds}


@dataclass
class PatternSelections:
    """A choice's stored selections at their current revision, checked to belong to this model. A hit
    reads only the patterns' revisions; a selection is parsed only when its revision is first served."""

    store: PatternStore
    fingerprint: str
    model: dict[str, str] = field(default_factory=dict)  # this model's name, architecture and precision
    _unions: set[tuple[str, ...]] = field(default_factory=set)  # unions leased so far
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _document(self, name: str) -> dict[str, Any]:
        check_stored(self.store, name)  # perhaps written by another process since this one last looked
        try:
            document = self.store.summary(name)
        except KeyError:  # removed since that look
            raise PatternNotFound(f"pattern {name!r} does not exist") from None
        if document.get("model_fingerprint") != self.fingerprint:
            stored = document.get("model") if isinstance(document.get("model"), dict) else None
            raise PatternUnusable(
                model_mismatch(name, str(document.get("model_fingerprint")), stored, self.fingerprint, self.model)
            )
        return document

    def calibrated_coverage(self, choice: Choice) -> float | None:
        """The coverage a single pattern recorded at calibration, on its answers' tokens when it recorded
        them (None for unions, the full model, and patterns calibrated before it was recorded)."""
        if len(choice.patterns) != 1:
            return None
        return reference_coverage((self._document(choice.patterns[0]).get("parameters") or {}).get("coverage"))

    def of(self, choice: Choice) -> tuple[VariantKey, Callable[[], Selection | None]]:
        """The revision key of `choice` and a function that parses its (union) selection once."""
        documents = [self._document(name) for name in choice.patterns]
        revision = UNION_SEPARATOR.join(str(document["tensors"]) for document in documents)
        key = VariantKey(choice.label if choice.patterns else None, revision)
        if len(choice.patterns) > 1:
            with self._lock:
                self._unions.add(choice.patterns)

        @functools.cache
        def selection() -> Selection | None:
            if not documents:
                return None
            if len(documents) == 1 and documents[0]["selection"].get("substitute", "none") != "none":
                return self.store.get(choice.patterns[0]).selection  # its novices are in its tensor file
            # a union routes among what its patterns keep together: no pattern's novices stand for it
            return union([Selection.from_json(document["selection"], schema_only=True) for document in documents])

        return key, selection

    def labels_with(self, name: str) -> list[str]:
        """The labels of `name` and of every union leased so far that contains it (which are forgotten)."""
        with self._lock:
            unions = {patterns for patterns in self._unions if name in patterns}
            self._unions -= unions
        return [name, *sorted(UNION_SEPARATOR.join(patterns) for patterns in unions)]


@contextmanager
def _leasing_errors(label: str, metrics: Metrics) -> Any:
    """What leasing raises, in the domain's terms: a selection the model refuses, no room (counted), a
    failed load (logged with its cause)."""
    try:
        yield
    except (SelectionError, PatternError) as error:
        raise PatternUnusable(f"pattern {label!r} does not fit this model: {error}") from None
    except NoRoom:
        metrics.cache_refusals.inc()
        raise
    except LoadFailed as error:
        log.error("%s", error, exc_info=error.__cause__)
        raise


def pool_slots(builder: VariantBuilder, budget: int, quantized: SlotFormat | None = None) -> int:
    """Expert slots per sparse layer that `budget` bytes pay for (one slot costs one expert in every layer, in
    the slots' precision), at most the experts a layer has; a budget that cannot hold one top-k routing is an
    error."""
    per_slot = sum(slot_expert_bytes(builder, index, quantized) for index in builder.sparse_layers)
    most = max(layer.num_experts for layer in builder.sparse_layers.values())
    slots = min(budget // per_slot, most)
    top_k = int(builder.config.num_experts_per_tok)
    if slots < top_k:
        raise ValueError(
            f"--cache-budget {budget} bytes holds {slots} experts per layer; routing needs at least {top_k} "
            f"({top_k * per_slot} bytes)"
        )
    return int(slots)


def static_length(config: ServerConfig, pooled: PooledModel) -> int | None:
    """The static cache's columns when the pool's batch decodes in one (`--static-decode`), else None."""
    wanted = config.static_decode == "on" or (config.static_decode == "auto" and pooled.device.type == "cuda")
    if not wanted:
        return None
    if not static_decodable(pooled.model):
        log.info("static decoding is off: the model has linear-attention or sliding-window layers")
        return None
    return config.static_cache_tokens


class PoolLeases:
    """Leases on one expert pool; every pattern's rows share one batched decoder."""

    MAX_ROUTES = 1024  # revisions of replaced patterns pile up otherwise

    def __init__(self, builder: VariantBuilder, selections: PatternSelections, config: ServerConfig, metrics: Metrics):
        self.builder, self.selections, self.metrics = builder, selections, metrics
        quantized = pool_expert_format(builder, config.expert_dtype)
        pooled = PooledModel(builder, pool_slots(builder, config.cache_budget, quantized), config.expert_dtype)
        self.pool = ExpertPool(pooled, metrics.pool_listener(), wait=config.cache_wait)
        metrics.watch_pool(self.pool)
        self.budget = config.cache_budget
        if config.coverage_rate > 0:
            pooled.coverage = CoverageMeter(
                config.coverage_rate, config.coverage_tolerance, metrics.coverage_listener()
            )
        self.decoder: BatchedDecoder | None = None
        if config.max_batch > 1 and batchable(pooled.model):
            self.decoder = BatchedDecoder(
                pooled.model,
                config.max_batch,
                pooled=pooled,
                max_prefill_tokens=config.max_prefill_tokens,
                static_length=static_length(config, pooled),
            )
        self._routes: dict[VariantKey, RowRoute] = {}
        self._routes_lock = threading.Lock()  # a replace's purge against a request adding its route

    def acquire(self, choice: Choice) -> Lease:
        key, selection = self.selections.of(choice)
        with _leasing_errors(key.label, self.metrics):
            route = self._routes.get(key)
            if route is None:
                calibrated = self.selections.calibrated_coverage(choice)
                chosen = selection()
                kept, novices = self.builder.kept_experts(chosen), self.builder.novice_tables(chosen)
                route = RowRoute(key.label, kept, key.revision, calibrated, novices)
                with self._routes_lock:
                    if len(self._routes) >= self.MAX_ROUTES:
                        self._routes.clear()
                    self._routes[key] = route
            return _PooledLease(self.pool.acquire(key, route), self.decoder, self.pool)

    def forget(self, name: str) -> None:
        """`name` was replaced or removed: its routes (and those of the unions with it) go, and with them their
        novice tables on the device (a lease in use holds its own route until it ends)."""
        labels = set(self.selections.labels_with(name))
        for label in labels:
            self.pool.forget(label)
        with self._routes_lock:
            for key in [key for key in self._routes if key.label in labels]:
                del self._routes[key]

    def novice_bytes(self) -> int:
        """The novice tables of the routes known (on the pool's device, outside `--cache-budget`)."""
        with self._routes_lock:
            routes = list(self._routes.values())
        return sum(table.nbytes for route in routes for table in route.novices.values())

    def evict(self, label: str) -> int | None:
        """Free the slots of the pattern's experts that nothing pins (0 when all are in use); None: never
        leased."""
        return self.pool.evict(label)

    def coverage(self, label: str) -> dict[str, Any] | None:
        meter = self.pool.pooled.coverage
        return None if meter is None else meter.report(label)

    def report(self) -> dict[str, Any]:
        pool = self.pool.snapshot()
        if self.decoder is not None and self.decoder.static is not None:
            pool["static_decode"] = self.decoder.static.report()
        return {
            "budget_bytes": self.budget,
            "backbone_bytes": self.builder.backbone_bytes,
            "resident_bytes": pool["resident_bytes"],
            "novice_bytes": self.novice_bytes(),
            "evictions": pool["evicted_experts"],
            "data": pool.pop("patterns"),
            "pool": pool,
        }


class VariantLeases:
    """Leases on a cache of built variants; each variant decodes in a batch of its own."""

    def __init__(self, builder: VariantBuilder, selections: PatternSelections, config: ServerConfig, metrics: Metrics):
        self.builder, self.selections, self.metrics = builder, selections, metrics
        self.cache = VariantCache(config.cache_budget, metrics.cache_listener(), wait=config.cache_wait)
        self.max_batch, self.max_prefill_tokens = config.max_batch, config.max_prefill_tokens
        self._decoders = threading.Lock()

    def acquire(self, choice: Choice) -> Lease:
        key, selection = self.selections.of(choice)

        def build() -> Any:
            model = self.builder.build(selection())
            self.metrics.backbone.set(self.builder.backbone_bytes)
            return model

        with _leasing_errors(key.label, self.metrics):
            variant = self.cache.acquire(key, lambda: self.builder.variant_bytes(selection()), build)
        return _CachedLease(variant, self._decoder(variant), self.cache)

    def _decoder(self, variant: Variant) -> BatchedDecoder | None:
        if self.max_batch <= 1 or not batchable(variant.model):
            return None
        with self._decoders:
            if variant.decoder is None:
                variant.decoder = BatchedDecoder(
                    variant.model, self.max_batch, max_prefill_tokens=self.max_prefill_tokens
                )
            return variant.decoder

    def forget(self, name: str) -> None:
        for label in self.selections.labels_with(name):
            self.cache.evict(label)

    def coverage(self, label: str) -> dict[str, Any] | None:
        return None  # a variant runs only its kept experts' router: there is no full choice to compare with

    def evict(self, label: str) -> int | None:
        """Drop the pattern's variant ('full': the full model's); None: nothing of it is cached."""
        return self.cache.evict(None if label == FULL_MODEL else label) or None

    def report(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.cache.budget,
            "backbone_bytes": self.builder.backbone_bytes,
            "resident_bytes": self.cache.resident_bytes,
            "evictions": self.cache.evictions,
            "data": self.cache.snapshot(),
        }


def make_leases(builder: VariantBuilder, store: PatternStore, fingerprint: str, config: ServerConfig, metrics: Metrics):
    """The pool for an MoE model (unless `--expert-pool false`), else the variant cache."""
    selections = PatternSelections(store, fingerprint, model_identity(builder.model_dir))
    metrics.budget.set(config.cache_budget)
    if config.expert_pool and builder.family.kind == "moe":
        metrics.backbone.set(builder.backbone_bytes)
        return PoolLeases(builder, selections, config, metrics)
    return VariantLeases(builder, selections, config, metrics)
