"""The variant cache: least-recently-used variants under a byte budget.

What a server under load needs from it:

- a variant in use is pinned (a lease) and never evicted mid-generation;
- concurrent requests for the same missing variant build it once and all wait for that build;
- a failed build is reported to every waiter and leaves nothing behind, so the next request retries;
- the budget is never exceeded: a build reserves its bytes (known before reading anything) and evicts
  unpinned variants to make room; when even that cannot make room the request is refused (`NoRoom`,
  which the API turns into 503 with Retry-After);
- an evicted variant is dropped by the cache entirely, so its memory is freed as soon as no lease holds it.

The budget counts what each variant adds beyond the shared backbone (its experts or channels); the
backbone is read once and shared by every variant, and is reported apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from server.admission import Admission
from server.config import FULL_MODEL
from server.errors import LoadFailed, NoRoom

log = logging.getLogger("taskmoe.cache")


@dataclass(frozen=True)
class VariantKey:
    """A pattern, a union `a+b` (None: the full model) at one revision (its patterns' tensor files, fresh
    for every write): replacing a pattern makes a new key, so an old variant can never serve it again."""

    pattern: str | None
    revision: str = ""

    @property
    def label(self) -> str:
        return self.pattern or FULL_MODEL


@dataclass
class Variant:
    key: VariantKey
    model: Any
    nbytes: int
    build_seconds: float
    pins: int = 0
    hits: int = 0
    last_used: float = field(default_factory=time.monotonic)
    doomed: bool = False  # dropped as soon as its last lease ends
    decoder: Any = None  # the variant's batched decoder (server.batching), made on first use


@dataclass
class CacheListener:
    """Hooks for metrics and logs; all optional."""

    hit: Callable[[VariantKey], None] = lambda key: None
    miss: Callable[[VariantKey], None] = lambda key: None
    built: Callable[[Variant], None] = lambda variant: None
    evicted: Callable[[Variant], None] = lambda variant: None


@dataclass
class _Pending:
    size: int
    future: Future[Variant] = field(default_factory=Future)
    waiters: int = 0


class VariantCache:
    def __init__(self, budget: int, listener: CacheListener | None = None, wait: float = 30.0) -> None:
        if budget <= 0:
            raise ValueError("the cache budget must be positive")
        self.budget = budget
        self.listener = listener or CacheListener()
        self._entries: OrderedDict[VariantKey, Variant] = OrderedDict()  # least recently used first
        self._pending: dict[VariantKey, _Pending] = {}
        self._draining: dict[int, Variant] = {}  # dropped while in use: freed when the last lease ends
        self._lock = threading.Lock()
        self._admission = Admission(self._lock, wait)
        self.evictions = 0

    # -- accounting --------------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return self._resident()

    def _resident(self) -> int:
        return sum(v.nbytes for v in self._entries.values()) + sum(v.nbytes for v in self._draining.values())

    def _committed(self) -> int:
        return self._resident() + sum(p.size for p in self._pending.values())

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "pattern": v.key.label,
                    "bytes": v.nbytes,
                    "pinned": v.pins,
                    "hits": v.hits,
                    "idle_seconds": round(now - v.last_used, 3),
                    "build_seconds": round(v.build_seconds, 4),
                }
                for v in reversed(self._entries.values())  # most recently used first
            ]

    def __contains__(self, key: VariantKey) -> bool:
        with self._lock:
            return key in self._entries

    # -- leasing -----------------------------------------------------------------------------------

    def acquire(
        self, key: VariantKey, size: int | Callable[[], int], build: Callable[[], Any], wait: float | None = None
    ) -> Variant:
        """The variant for `key`, pinned until `release`; built (once) by `build()` when missing.
        `size` is the bytes the build will allocate (or a function that computes them, called only on a
        miss), reserved against the budget before it starts. When the room is held by variants in use, wait
        up to `wait` seconds (default: the cache's) for a release, first come first served."""
        deadline = self._admission.deadline(wait)
        with self._lock:
            found = self._admit(key, size, deadline)
        if isinstance(found, Variant):
            self._notify("hit", key)
            return found
        pending, owner = found
        if not owner:
            self._notify("hit", key)
            return pending.future.result()
        self._notify("miss", key)
        return self._build(key, pending, build)

    def _admit(
        self, key: VariantKey, size: int | Callable[[], int], deadline: float
    ) -> Variant | tuple[_Pending, bool]:
        """In turn (lock held): a hit (pinned), a build in flight to wait for (`owner` False), or room made
        and reserved for a build of our own (`owner` True)."""
        needed: list[int] = []  # the miss's size, computed once

        def fits() -> bool:
            if key in self._entries or key in self._pending:
                return True
            if not needed:
                needed.append(size() if callable(size) else size)
                self._check_budget(needed[0], key)
            return self._room_after_evicting() >= needed[0]

        def refusal(ahead: int) -> str:
            if ahead:
                return f"{key.label}: {ahead} requests are waiting ahead for room; retry shortly"
            return (
                f"the variant for {key.label} needs {needed[0]} bytes; {self.budget - self._committed()} of the "
                f"{self.budget}-byte budget are free and the other variants are in use; retry shortly"
            )

        self._admission.admit(fits, deadline, refusal)
        variant = self._entries.get(key)
        if variant is not None:
            variant.pins += 1
            variant.hits += 1
            variant.last_used = time.monotonic()
            self._entries.move_to_end(key)
            return variant
        pending = self._pending.get(key)
        if pending is not None:
            pending.waiters += 1
            return pending, False
        self._make_room(needed[0])
        pending = self._pending[key] = _Pending(needed[0])
        return pending, True

    def _build(self, key: VariantKey, pending: _Pending, build: Callable[[], Any]) -> Variant:
        started = time.perf_counter()
        try:
            model = build()
        except BaseException as error:
            with self._lock:
                del self._pending[key]
                self._admission.freed()
            failure = LoadFailed(f"building the variant for {key.label} failed: {error}")
            pending.future.set_exception(failure)
            raise failure from error
        variant = Variant(key, model, pending.size, time.perf_counter() - started)
        with self._lock:
            del self._pending[key]
            variant.pins = 1 + pending.waiters
            self._entries[key] = variant
            self._admission.freed()
            self._notify("built", variant)  # under the lock: an eviction cannot be reported before it
        pending.future.set_result(variant)
        return variant

    def release(self, variant: Variant) -> None:
        with self._lock:
            variant.pins -= 1
            variant.last_used = time.monotonic()
            if variant.doomed and variant.pins == 0:
                self._draining.pop(id(variant), None)
            if variant.pins == 0:
                self._admission.freed()

    # -- making room and evicting --------------------------------------------------------------------

    def _check_budget(self, size: int, key: VariantKey) -> None:
        if size > self.budget:
            raise NoRoom(
                f"the variant for {key.label} needs {size} bytes, more than the whole cache budget of "
                f"{self.budget} bytes; raise --cache-budget",
                retry_after=60,
                permanent=True,
            )

    def _room_after_evicting(self) -> int:
        """Free bytes once every unpinned variant is evicted (lock held)."""
        evictable = sum(v.nbytes for v in self._entries.values() if v.pins == 0)
        return self.budget - self._committed() + evictable

    def _make_room(self, size: int) -> None:
        """Evict unpinned variants, least recently used first, until `size` more bytes fit (lock held; the
        admission checked that they can)."""
        free = self.budget - self._committed()
        for victim in [v for v in self._entries.values() if v.pins == 0]:
            if free >= size:
                break
            del self._entries[victim.key]
            free += victim.nbytes
            self._evicted(victim)

    def _evicted(self, variant: Variant) -> None:
        self.evictions += 1
        self._notify("evicted", variant)

    def _notify(self, event: str, subject: Any) -> None:
        """Tell the listener; a failing listener (metrics) never breaks the cache or strands a waiter."""
        try:
            getattr(self.listener, event)(subject)
        except Exception:
            log.exception("variant cache listener failed on %s", event)

    def evict(self, pattern: str | None) -> int:
        """Drop every cached revision of `pattern` (None: the full model); a variant in use is dropped when
        its last lease ends. Returns how many variants were dropped or marked to be dropped."""
        dropped: list[Variant] = []
        marked = 0
        with self._lock:
            for key, variant in list(self._entries.items()):
                if key.pattern != pattern:
                    continue
                variant.doomed = True
                marked += 1
                del self._entries[key]
                dropped.append(variant)
                if variant.pins:
                    self._draining[id(variant)] = variant
            for variant in dropped:
                self._evicted(variant)
            self._admission.freed()
        return marked
