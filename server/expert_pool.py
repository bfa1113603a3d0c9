"""The expert pool: which routed experts are resident, in which slots, and who is using them.

One pool per MoE model replaces the cache of separate variants. A request leases its pattern: the pool pins
every expert the pattern keeps (reference counts per expert), loads into free slots, or into slots of
unpinned experts evicted least-recently-used, just the experts that are not resident yet, and hands back a
`PoolLease` whose model routes every row as the pattern's variant. Patterns that keep the same experts share
them; a task switch copies only what the new pattern lacks.

What a server under load needs from it, as from the variant cache it replaces:

- an expert in use by a running row is never evicted (pinned until its lease ends);
- concurrent requests needing the same missing expert share one load (the later ones wait for it);
- a failed load is reported to every waiter and leaves the slot free, so the next request retries;
- the slots are never exceeded: when the union of the running patterns' experts cannot fit, a request waits
  up to `wait` seconds for leases to end, then gets `NoRoom` (503 with Retry-After); waiting requests are
  served first come first served, and while one waits, newcomers queue behind it (`server.admission`);
- a pattern that keeps more experts in some layer than the pool has slots is refused outright.
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
from server.cache import VariantKey
from server.errors import LoadFailed, NoRoom
from server.model.pooled import PooledModel, RoutedModel, RowRoute

log = logging.getLogger("taskmoe.pool")


@dataclass
class PoolLease:
    """A pattern's experts pinned in the pool; `model` runs as its variant. End it with `ExpertPool.release`."""

    key: VariantKey
    route: RowRoute
    model: RoutedModel
    nbytes: int  # bytes of the pattern's experts (resident while the lease lasts)
    build_seconds: float  # time spent loading what was missing (0 when everything was resident)
    loaded: int = 0  # experts this lease copied in
    pins: dict[int, tuple[int, ...]] = field(default_factory=dict)  # per layer, the experts it pinned


@dataclass
class PoolListener:
    """Hooks for metrics; all optional."""

    hit: Callable[[VariantKey], None] = lambda key: None
    miss: Callable[[VariantKey], None] = lambda key: None
    loaded: Callable[[VariantKey, int, int, float], None] = lambda key, experts, nbytes, seconds: None
    evicted: Callable[[int], None] = lambda experts: None


@dataclass
class _LayerState:
    """One sparse layer's slots: who sits where, who is pinned, who may go."""

    slots: int
    experts: int
    where: dict[int, int] = field(default_factory=dict)  # resident expert -> slot
    refs: dict[int, int] = field(default_factory=dict)  # pinned expert -> leases holding it
    idle: OrderedDict[int, None] = field(default_factory=OrderedDict)  # resident, unpinned; least recent first
    loading: dict[int, Future[None]] = field(default_factory=dict)  # expert -> its load in flight
    free: list[int] = field(default_factory=list)  # free slots, lowest last (popped first)

    def __post_init__(self) -> None:
        self.free = list(range(self.slots - 1, -1, -1))

    def needs(self, route: RowRoute, index: int) -> tuple[int, ...]:
        return route.kept.get(index) or tuple(range(self.experts))

    def missing(self, needed: tuple[int, ...]) -> list[int]:
        return [e for e in needed if e not in self.where and e not in self.loading]

    def room(self, needed: tuple[int, ...]) -> int:
        """Slots that experts missing from `needed` could take: free ones and idle experts not in `needed`."""
        wanted = set(needed)
        return len(self.free) + sum(1 for expert in self.idle if expert not in wanted)

    def unpin(self, experts: tuple[int, ...]) -> None:
        """A lease holding `experts` ended; those no lease holds any more become idle, most recently used last."""
        for expert in experts:
            self.refs[expert] -= 1
            if self.refs[expert] == 0:
                del self.refs[expert]
                if expert in self.where:
                    self.idle[expert] = None

    def take_slot(self) -> tuple[int, int | None]:
        """A slot for a missing expert: a free one (lowest first), else the least recently used idle expert's;
        and that evicted expert (None for a free slot)."""
        if self.free:
            return self.free.pop(), None
        victim, _ = self.idle.popitem(last=False)
        return self.where.pop(victim), victim

    def free_idle(self, experts: tuple[int, ...]) -> list[int]:
        """Evict those of `experts` that are idle; returns them."""
        evicted = []
        for expert in experts:
            if expert in self.idle:
                del self.idle[expert]
                self.free.append(self.where.pop(expert))
                evicted.append(expert)
        self.free.sort(reverse=True)  # lowest slot first: cold loads stay in runs
        return evicted

    def occupancy(self) -> dict[str, int]:
        return {
            "slots": self.slots,
            "resident": len(self.where),
            "pinned": len(self.refs),
            "loading": len(self.loading),
        }


def _residency(
    layers: dict[int, _LayerState], label: str, key: VariantKey, route: RowRoute, nbytes: int
) -> dict[str, Any]:
    """How much of a pattern's experts is resident, and per layer the experts a request of it would load."""
    needed = resident = 0
    missing: dict[str, list[int]] = {}
    for index, state in layers.items():
        wanted = state.needs(route, index)
        needed += len(wanted)
        absent = [expert for expert in wanted if expert not in state.where]
        resident += len(wanted) - len(absent)
        if absent:
            missing[str(index)] = absent
    return {
        "pattern": label,
        "revision": key.revision,
        "experts": needed,
        "resident_experts": resident,
        "resident_fraction": round(resident / needed, 4) if needed else 1.0,
        "bytes": nbytes,
        "missing_experts": missing,  # per layer, the experts a request would load
    }


class ExpertPool:
    """The routed-expert slots of one pooled model, leased per pattern (see the module's docstring)."""

    def __init__(self, pooled: PooledModel, listener: PoolListener | None = None, wait: float = 30.0) -> None:
        self.pooled = pooled
        self.listener = listener or PoolListener()
        self.layers = {
            index: _LayerState(pooled.slots[index], layer.num_experts) for index, layer in pooled.layers.items()
        }
        self._expert_bytes = {index: pooled.expert_bytes(index) for index in pooled.layers}
        self._lock = threading.Lock()
        self._admission = Admission(self._lock, wait)
        self._routes: dict[str, tuple[VariantKey, RowRoute]] = {}  # the latest revision of each pattern leased
        self.loaded_experts = 0
        self.evicted_experts = 0

    # -- accounting ------------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return sum(state.slots for state in self.layers.values())

    @property
    def capacity_bytes(self) -> int:
        return sum(state.slots * self._expert_bytes[index] for index, state in self.layers.items())

    def route_bytes(self, route: RowRoute) -> int:
        """Bytes of the experts `route` needs (fixed by the route and the slot sizes: no lock needed)."""
        return sum(len(state.needs(route, index)) * self._expert_bytes[index] for index, state in self.layers.items())

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return self._resident_bytes()

    def _resident_bytes(self) -> int:
        return sum(len(state.where) * self._expert_bytes[index] for index, state in self.layers.items())

    def used_slots(self) -> dict[int, int]:
        """Per layer, the slots holding or receiving an expert (a consistent snapshot)."""
        with self._lock:
            return {index: len(state.where) + len(state.loading) for index, state in self.layers.items()}

    def snapshot(self) -> dict[str, Any]:
        """Occupancy, and per pattern leased so far how many of its experts are resident."""
        with self._lock:
            return {
                "slots": self.slots,
                "expert_dtype": self.pooled.expert_dtype,
                "used_slots": sum(len(state.where) for state in self.layers.values()),
                "capacity_bytes": self.capacity_bytes,
                "resident_bytes": self._resident_bytes(),
                "loaded_experts": self.loaded_experts,
                "evicted_experts": self.evicted_experts,
                "layers": {str(index): state.occupancy() for index, state in self.layers.items()},
                "patterns": [
                    _residency(self.layers, label, key, route, self.route_bytes(route))
                    for label, (key, route) in sorted(self._routes.items())
                ],
            }

    # -- leasing -----------------------------------------------------------------------------------------

    def acquire(self, key: VariantKey, route: RowRoute, wait: float | None = None) -> PoolLease:
        """Pin `route`'s experts, loading the missing ones; wait up to `wait` seconds (default: the pool's)
        for room held by leases in use."""
        deadline = self._admission.deadline(wait)
        with self._lock:
            self._check_fits(key, route)
            self._admission.admit(lambda: self._has_room(route), deadline, lambda ahead: self._refusal(key, ahead))
            mine, theirs, pins = self._reserve(route)
            self._routes[key.label] = (key, route)
        started = time.perf_counter()
        lease = PoolLease(key, route, self.pooled.routed(route), self.route_bytes(route), 0.0, pins=pins)
        loaded = sum(len(experts) for experts in mine.values())
        self._notify("miss" if loaded or theirs else "hit", key)
        try:
            self._load(mine)
            for future in theirs:
                future.result()
        except BaseException as error:
            self.release(lease)
            raise LoadFailed(f"loading the experts of {key.label} failed: {error}") from error
        lease.build_seconds = time.perf_counter() - started
        lease.loaded = loaded
        if loaded:
            nbytes = sum(len(experts) * self._expert_bytes[index] for index, experts in mine.items())
            self._notify("loaded", key, loaded, nbytes, lease.build_seconds)
        return lease

    def release(self, lease: PoolLease) -> None:
        """End a lease: its experts stay resident, and become evictable once no other lease pins them."""
        with self._lock:
            for index, experts in lease.pins.items():
                self.layers[index].unpin(experts)
            lease.pins = {}
            self._admission.freed()

    def evict(self, pattern: str) -> int | None:
        """Free the slots of `pattern`'s experts that no lease pins (other patterns reload them on demand).
        Returns how many were freed, or None when the pattern was never leased."""
        with self._lock:
            known = self._routes.get(pattern)
            if known is None:
                return None
            freed = 0
            for index, state in self.layers.items():
                for expert in state.free_idle(state.needs(known[1], index)):
                    self.pooled.place(index, expert, -1)
                    freed += 1
            if freed:
                self.evicted_experts += freed
                self._notify("evicted", freed)
            self._admission.freed()
            return freed

    def forget(self, pattern: str) -> int:
        """A pattern was replaced or removed: stop reporting it. Its experts stay (other patterns may share
        them) and are evicted as any idle expert; leases in use end normally. Returns 1 if it was known."""
        with self._lock:
            return 1 if self._routes.pop(pattern, None) is not None else 0

    # -- inside the lock ------------------------------------------------------------------------------

    def _refusal(self, key: VariantKey, ahead: int) -> str:
        waiting = f", {ahead} requests waiting ahead" if ahead else ""
        occupancy = f"{self._occupancy()}{waiting}"
        return f"the experts of {key.label} do not fit beside the patterns in use ({occupancy}); retry shortly"

    def _check_fits(self, key: VariantKey, route: RowRoute) -> None:
        for index, state in self.layers.items():
            needed = len(state.needs(route, index))
            if needed > state.slots:
                raise NoRoom(
                    f"{key.label} keeps {needed} experts in layer {index}, more than the pool's {state.slots} slots "
                    "per layer; raise --cache-budget",
                    retry_after=60,
                    permanent=True,
                )

    def _has_room(self, route: RowRoute) -> bool:
        for index, state in self.layers.items():
            needed = state.needs(route, index)
            if len(state.missing(needed)) > state.room(needed):
                return False
        return True

    def _occupancy(self) -> str:
        pinned = sum(len(state.refs) for state in self.layers.values())
        return f"{pinned} of {self.slots} expert slots pinned"

    def _reserve(
        self, route: RowRoute
    ) -> tuple[dict[int, list[tuple[int, int]]], list[Future[None]], dict[int, tuple[int, ...]]]:
        """Pin every expert of `route`, give slots to the missing ones (evicting idle experts, least recently
        used first) and mark them loading. Returns the loads this caller must do per layer as (expert, slot),
        the loads of others it must wait for, and the pins."""
        mine: dict[int, list[tuple[int, int]]] = {}
        theirs: list[Future[None]] = []
        pins: dict[int, tuple[int, ...]] = {}
        for index, state in self.layers.items():
            needed = state.needs(route, index)
            missing = state.missing(needed)
            for expert in needed:
                state.refs[expert] = state.refs.get(expert, 0) + 1
                state.idle.pop(expert, None)
                if expert in state.loading:
                    theirs.append(state.loading[expert])
            pins[index] = needed
            evicted = 0
            for expert in missing:
                slot, victim = state.take_slot()
                if victim is not None:
                    self.pooled.place(index, victim, -1)
                    evicted += 1
                state.loading[expert] = Future()
                mine.setdefault(index, []).append((expert, slot))
            if evicted:
                self.evicted_experts += evicted
                self._notify("evicted", evicted)
        return mine, theirs, pins

    # -- loading (outside the lock) -----------------------------------------------------------------------

    def _load(self, mine: dict[int, list[tuple[int, int]]]) -> None:
        """Copy this caller's experts into their slots; publish each layer's when done. On a failure, free
        the slots of everything not yet published and fail its waiters."""
        pending = {index: list(pairs) for index, pairs in mine.items()}
        try:
            for index in list(pending):
                pairs = sorted(pending[index])
                self.pooled.load(index, [e for e, _ in pairs], [s for _, s in pairs])
                with self._lock:
                    state = self.layers[index]
                    for expert, slot in pairs:
                        state.where[expert] = slot
                        self.pooled.place(index, expert, slot)
                        state.loading.pop(expert).set_result(None)
                    self.loaded_experts += len(pairs)
                del pending[index]
        except BaseException as error:
            with self._lock:
                for index, pairs in pending.items():
                    state = self.layers[index]
                    for expert, slot in pairs:
                        state.free.append(slot)
                        state.loading.pop(expert).set_exception(error)
                self._admission.freed()
            raise

    def _notify(self, event: str, *args: Any) -> None:
        """Tell the listener; a failing listener (metrics) never breaks the pool."""
        try:
            getattr(self.listener, event)(*args)
        except Exception:
            log.exception("expert pool listener failed on %s", event)
