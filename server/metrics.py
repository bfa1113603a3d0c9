"""Prometheus metrics of one server instance (its own registry: two apps in one process never mix)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pattern_store.store import PatternStore
from server.cache import CacheListener, Variant, VariantKey
from server.expert_pool import ExpertPool, PoolListener
from server.model.coverage_meter import PatternCoverage

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "taskmoe_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "taskmoe_request_seconds", "Request latency by route", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "taskmoe_time_to_first_token_seconds",
            "Time to the first streamed token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "taskmoe_tokens", "Tokens processed, by kind (prompt or completion)", ["kind"], registry=r
        )
        self.active = Gauge("taskmoe_active_generations", "Generations running now", registry=r)
        self.cancelled = Counter(
            "taskmoe_generations_cancelled", "Generations stopped by a client disconnect", registry=r
        )
        self._store_metrics(r)
        self.cache_hits = Counter(
            "taskmoe_cache_hits", "Variant cache hits (shared in-flight builds included)", registry=r
        )
        self.cache_misses = Counter("taskmoe_cache_misses", "Variant cache misses (each one a build)", registry=r)
        self.cache_evictions = Counter("taskmoe_cache_evictions", "Variants evicted from the cache", registry=r)
        self.cache_refusals = Counter("taskmoe_cache_refusals", "Requests refused: the variant did not fit", registry=r)
        self.build_seconds = Histogram(
            "taskmoe_variant_build_seconds", "Time to build a variant", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.resident = Gauge(
            "taskmoe_variant_resident_bytes",
            "Bytes a cached variant holds beyond the backbone",
            ["pattern"],
            registry=r,
        )
        self.backbone = Gauge("taskmoe_backbone_bytes", "Bytes of the shared backbone", registry=r)
        self.budget = Gauge("taskmoe_cache_budget_bytes", "The variant cache's byte budget", registry=r)
        self._pool_metrics(r)
        self.routes = Counter(
            "taskmoe_route_decisions",
            "Routing decisions by chosen pattern and reason",
            ["pattern", "reason"],
            registry=r,
        )
        self._coverage_metrics(r)
        self.route_seconds = Histogram(
            "taskmoe_route_seconds", "Time to route a query (embed and search)", buckets=_LATENCY_BUCKETS, registry=r
        )

    def cache_listener(self) -> CacheListener:
        resident: dict[str, int] = {}  # per pattern label: revisions of one pattern add up
        lock = threading.Lock()

        def built(variant: Variant) -> None:
            self.build_seconds.observe(variant.build_seconds)
            with lock:
                resident[variant.key.label] = resident.get(variant.key.label, 0) + variant.nbytes
                self.resident.labels(variant.key.label).set(resident[variant.key.label])

        def evicted(variant: Variant) -> None:
            self.cache_evictions.inc()
            label = variant.key.label
            with lock:
                resident[label] = resident.get(label, 0) - variant.nbytes
                if resident[label] <= 0:
                    resident.pop(label)
                    self.resident.remove(label)
                else:
                    self.resident.labels(label).set(resident[label])

        return CacheListener(
            hit=lambda key: self.cache_hits.inc(),
            miss=lambda key: self.cache_misses.inc(),
            built=built,
            evicted=evicted,
        )

    def pool_listener(self) -> PoolListener:
        def loaded(key: VariantKey, experts: int, nbytes: int, seconds: float) -> None:
            self.pool_loaded.inc(experts)
            self.pool_loaded_bytes.inc(nbytes)
            self.build_seconds.observe(seconds)

        return PoolListener(
            hit=lambda key: self.cache_hits.inc(),
            miss=lambda key: self.cache_misses.inc(),
            loaded=loaded,
            evicted=lambda experts: self.pool_evicted.inc(experts),
        )

    def watch_pool(self, pool: ExpertPool) -> None:
        """The pool's size, and its occupancy read when metrics are scraped."""
        self.pool_slots.set(pool.slots)
        self.pool_capacity.labels(pool.pooled.expert_dtype).set(pool.capacity_bytes)
        self.pool_slots_used.set_function(lambda: sum(pool.used_slots().values()))

    def _pool_metrics(self, r: CollectorRegistry) -> None:
        self.pool_slots = Gauge("taskmoe_pool_slots", "Expert slots of the pool (all layers)", registry=r)
        self.pool_capacity = Gauge(
            "taskmoe_pool_capacity_bytes",
            "Bytes of the pool's expert slots, in what a slot holds (fp8: values and scales)",
            ["expert_dtype"],
            registry=r,
        )
        self.pool_slots_used = Gauge(
            "taskmoe_pool_slots_used", "Expert slots holding (or receiving) an expert", registry=r
        )
        self.pool_loaded = Counter("taskmoe_pool_experts_loaded", "Experts copied into the pool", registry=r)
        self.pool_loaded_bytes = Counter(
            "taskmoe_pool_loaded_bytes", "Bytes of experts copied into the pool", registry=r
        )
        self.pool_evicted = Counter("taskmoe_pool_experts_evicted", "Experts evicted from the pool", registry=r)

    def _coverage_metrics(self, r: CollectorRegistry) -> None:
        self.coverage = Gauge(
            "taskmoe_pattern_coverage",
            "Recent live coverage: the share of the full router's top-k gate mass on the pattern's kept experts",
            ["pattern"],
            registry=r,
        )
        self.coverage_calibrated = Gauge(
            "taskmoe_pattern_coverage_calibrated", "The coverage the pattern recorded at calibration", ["pattern"],
            registry=r,
        )  # fmt: skip
        self.coverage_samples = Gauge(
            "taskmoe_pattern_coverage_samples", "Sampled rows behind the pattern's live coverage", ["pattern"],
            registry=r,
        )  # fmt: skip
        self.coverage_low = Gauge(
            "taskmoe_pattern_coverage_low",
            "1 when the pattern's recent live coverage is below its calibrated coverage by more than the tolerance",
            ["pattern"],
            registry=r,
        )
        self.confidence = Gauge(
            "taskmoe_pattern_confidence",
            "Mean probability the served pattern gave the tokens it generated, over its last watched requests "
            "(it tells right answers from wrong better than coverage does)",
            ["pattern"],
            registry=r,
        )

    def coverage_listener(self) -> Callable[[PatternCoverage], None]:
        def updated(entry: PatternCoverage) -> None:
            report = entry.report()
            if report["recent_mass"] is not None:  # before any decode step was sampled: the prompt's only
                self.coverage.labels(entry.label).set(report["recent_mass"])
            self.coverage_samples.labels(entry.label).set(entry.samples)
            self.coverage_low.labels(entry.label).set(1.0 if entry.flagged else 0.0)
            if entry.calibrated is not None:
                self.coverage_calibrated.labels(entry.label).set(entry.calibrated)
            if report["recent_confidence"] is not None:
                self.confidence.labels(entry.label).set(report["recent_confidence"])

        return updated

    def _store_metrics(self, r: CollectorRegistry) -> None:
        self.store_problems = Gauge(
            "taskmoe_store_problems", "Pattern store files skipped at its last read: damaged or unreadable", registry=r
        )
        self.store_changed_routes = Counter(
            "taskmoe_store_changed_routes",
            "Routed requests whose patterns left the store before they were leased (served by the fallback)",
            registry=r,
        )

    def watch_store(self, store: PatternStore) -> None:
        """The store's problems, counted when metrics are scraped."""
        self.store_problems.set_function(lambda: len(store.problems))

    def render(self) -> bytes:
        return generate_latest(self.registry)
