"""Everything one served model needs, built from the configuration at load and closed at shutdown: the
model's facts, its pattern store (followed on disk), the router and resolver, the lease manager, pattern
administration and the completion entry point. The app's lifespan owns one; nothing here knows HTTP."""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from typing import Any

import torch

from pattern_store.embedder import Embedder
from pattern_store.fallback_record import FallbackRecord, RecordedQuery
from pattern_store.store import PatternStore
from pattern_store.suggest import MIN_SIZE, Suggestion, suggest
from server.completions import Completions
from server.config import ServerConfig
from server.errors import RecordingOff
from server.leases import LeaseManager, make_leases
from server.metrics import Metrics
from server.model.variant import VariantBuilder
from server.model_info import ModelInfo
from server.pattern_admin import PatternAdmin
from server.resolver import Resolver
from server.routing import Router
from server.store_watch import StoreWatcher

log = logging.getLogger("taskmoe.runtime")


def set_torch_threads(requested: int | None, device: torch.device) -> int:
    """On the CPU, each worker thread that runs torch gets its own OpenMP team; several teams on a few cores
    spin against each other (`scripts/bench_server.py` measures it). One intra-op thread per worker, with
    concurrency across requests, is the default there."""
    if requested is None and device.type == "cpu":
        requested = 1
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def open_store(config: ServerConfig) -> PatternStore:
    """The configured store, checked against the configuration (the fallback and upstream patterns)."""
    store = PatternStore(config.store, create=True)
    for file, problem in sorted(store.problems.items()):
        log.warning("pattern store: %s: %s", store.pattern_dir / file, problem)
    fallback = config.fallback_pattern
    if fallback is not None and fallback not in store:
        raise ValueError(f"--fallback {fallback}: no such pattern in {config.store}; stored: {store.names()}")
    for pattern in config.upstream_map:
        if pattern not in store:
            raise ValueError(f"--upstream {pattern}=...: no such pattern in {config.store} (routing needs it)")
    return store


def follow_store(
    config: ServerConfig, store: PatternStore, leases: LeaseManager | None = None, router: Router | None = None
) -> StoreWatcher | None:
    """Follow what other processes write to the store (every `--store-poll` seconds; 0: never): a removed or
    replaced pattern's leases, and every union with it, never serve again, and the router starts learning
    the new store in the background (the poll never waits for it, nor does a request)."""
    if config.store_poll <= 0:
        return None

    def changed(before: dict[str, str], after: dict[str, str]) -> None:
        if leases is not None:
            for name, revision in before.items():
                if after.get(name) != revision:
                    leases.forget(name)
        if router is not None:
            router.relearning.request()

    watcher = StoreWatcher(store, config.store_poll, changed)
    watcher.start()
    return watcher


def make_router(config: ServerConfig, store: PatternStore, embedder: Embedder) -> Router:
    """The router with the configured policy, trained now rather than on the first request."""
    router = Router(store, embedder, policy=config.routing, fallback=config.fallback_pattern)
    router.learn()
    return router


class Runtime:
    """One served model and everything around it."""

    def __init__(self, config: ServerConfig, executor: Executor, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.builder = VariantBuilder(config.model, device=config.device, dtype=config.dtype)
        self.torch_threads = set_torch_threads(config.torch_threads, self.builder.device)
        self.info = ModelInfo.load(
            config.model, config.served_name, self.builder.config, self.builder.generation_config
        )
        self.store = open_store(config)
        self.metrics.watch_store(self.store)
        self.embedder = Embedder(config.embedder) if config.embedder else Embedder()
        self.router = make_router(config, self.store, self.embedder)
        self.resolver = Resolver(self.info.name, self.store, self.router, self.metrics)
        self.leases = make_leases(self.builder, self.store, self.info.fingerprint, config, self.metrics)
        self.patterns = PatternAdmin(
            self.info, self.builder, self.store, self.embedder, self.leases, config, learn=self.router.catch_up
        )
        upstream = tuple(config.upstream_map)
        self.completions = Completions(
            self.info, self.resolver, self.leases, self.metrics, executor, config.max_n, upstream
        )
        self.watcher = follow_store(config, self.store, self.leases, self.router)
        self.fallback_record: FallbackRecord | None = None
        if config.record_fallback > 0:
            self.fallback_record = FallbackRecord(self.store.root, config.record_fallback, config.record_text)
            self.router.recorder = self.fallback_record.add
            self.fallback_record.start()

    def recorded(self) -> FallbackRecord:
        """The fallback record; 409 when the server records nothing."""
        if self.fallback_record is None:
            raise RecordingOff(
                "this server records no fallback queries: start it with --record-fallback N (and --record-text "
                "to keep their prompts as examples)"
            )
        return self.fallback_record

    def suggestions(self, min_size: int = MIN_SIZE) -> tuple[list[RecordedQuery], list[Suggestion]]:
        """Candidate tasks in the recorded fallback traffic (`pattern_store.suggest`), with the snapshot of
        the record they index (the record goes on changing)."""
        weights = self.router.features.weights
        queries = self.recorded().queries()
        return queries, suggest(queries, self.store, weights.ngram_buckets, weights.topic, min_size)

    def store_report(self) -> dict[str, Any]:
        """`GET /admin/store`: the store as this server last read it: its patterns, the files it skipped and
        why, and whether routing has caught up with it."""
        problems = sorted(self.store.problems.items())
        return {
            "object": "pattern_store",
            "path": str(self.store.root),
            "revision": self.store.version,
            "routing_revision": self.router.learnt_version,
            "relearning": self.router.relearning.busy,
            "poll_seconds": self.config.store_poll,
            "patterns": self.store.names(),
            "problems": [{"file": str(self.store.pattern_dir / file), "reason": reason} for file, reason in problems],
        }

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.fallback_record is not None:
            self.fallback_record.close()
        self.patterns.close()
        self.router.close()
