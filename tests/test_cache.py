"""The variant cache: LRU under a byte budget, pinning, single-flight builds, failures, refusal, freeing."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from pattern_store.selection import Selection
from server.cache import CacheListener, VariantCache, VariantKey
from server.errors import LoadFailed, NoRoom
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_random_model


class Blob:
    """A stand-in variant that owns real memory."""

    def __init__(self, size: int) -> None:
        self.data = torch.empty(size, dtype=torch.uint8)


def key(name: str | None) -> VariantKey:
    return VariantKey(name)


def gated(build):
    """A build that waits for the returned gate, so that requests pile up on it."""
    gate = threading.Event()

    def waiting():
        gate.wait(5)
        return build()

    return waiting, gate


def concurrently(request, count: int, gate: threading.Event) -> None:
    """Run `request` on `count` threads, open the gate once they are all waiting, and join them."""
    threads = [threading.Thread(target=request) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(5)


def test_least_recently_used_unpinned_variant_is_evicted_and_budget_holds() -> None:
    cache = VariantCache(budget=250)
    for name in ("a", "b"):
        cache.release(cache.acquire(key(name), 100, lambda: Blob(100)))
    cache.release(cache.acquire(key("a"), 100, lambda: Blob(100)))  # "a" is now the most recent
    cache.release(cache.acquire(key("c"), 100, lambda: Blob(100)))
    assert key("b") not in cache and key("a") in cache and key("c") in cache
    assert cache.resident_bytes == 200 <= cache.budget
    assert cache.evictions == 1


def test_pinned_variant_is_never_evicted_and_a_full_cache_refuses() -> None:
    cache = VariantCache(budget=250, wait=0)
    a = cache.acquire(key("a"), 100, lambda: Blob(100))
    b = cache.acquire(key("b"), 100, lambda: Blob(100))
    with pytest.raises(NoRoom) as refused:
        cache.acquire(key("c"), 100, lambda: Blob(100))
    assert not refused.value.permanent
    assert key("a") in cache and key("b") in cache and cache.resident_bytes == 200
    cache.release(a)
    cache.release(cache.acquire(key("c"), 100, lambda: Blob(100)))  # now "a" can go
    assert key("a") not in cache and key("b") in cache
    cache.release(b)


def test_a_variant_larger_than_the_budget_is_refused_at_once() -> None:
    cache = VariantCache(budget=50, wait=10)
    started = time.monotonic()
    with pytest.raises(NoRoom) as refused:
        cache.acquire(key("a"), 100, lambda: Blob(100))
    assert refused.value.permanent and time.monotonic() - started < 1
    assert cache.resident_bytes == 0


def test_a_request_waits_for_a_pinned_variant_to_free_room() -> None:
    cache = VariantCache(budget=150, wait=10)
    a = cache.acquire(key("a"), 100, lambda: Blob(100))
    threading.Timer(0.3, cache.release, args=(a,)).start()
    started = time.monotonic()
    b = cache.acquire(key("b"), 100, lambda: Blob(100))
    assert 0.2 < time.monotonic() - started < 5
    assert key("a") not in cache and cache.resident_bytes == 100
    cache.release(b)


def test_concurrent_requests_for_a_missing_variant_build_it_once() -> None:
    cache = VariantCache(budget=1000)
    builds = []
    build, gate = gated(lambda: builds.append(1) or Blob(100))
    results = []
    concurrently(lambda: results.append(cache.acquire(key("a"), 100, build)), 6, gate)
    assert len(builds) == 1 and len(results) == 6
    assert len({id(variant) for variant in results}) == 1 and results[0].pins == 6
    for variant in results:
        cache.release(variant)
    assert results[0].pins == 0


def test_a_failed_build_reaches_every_waiter_and_does_not_poison_the_cache() -> None:
    cache = VariantCache(budget=1000)

    def fail() -> Blob:
        raise RuntimeError("disk on fire")

    failing, gate = gated(fail)
    errors = []

    def request() -> None:
        try:
            cache.acquire(key("a"), 100, failing)
        except LoadFailed as error:
            errors.append(str(error))

    concurrently(request, 4, gate)
    assert len(errors) == 4 and all("disk on fire" in e for e in errors)
    assert cache.resident_bytes == 0 and key("a") not in cache
    variant = cache.acquire(key("a"), 100, lambda: Blob(100))  # the next request retries and succeeds
    assert isinstance(variant.model, Blob)
    cache.release(variant)


def test_evicting_a_variant_in_use_drops_it_after_its_last_lease() -> None:
    cache = VariantCache(budget=1000)
    variant = cache.acquire(key("a"), 100, lambda: Blob(100))
    assert cache.evict("a") == 1
    assert key("a") not in cache and cache.resident_bytes == 100  # still counted: a request holds it
    cache.release(variant)
    assert cache.resident_bytes == 0


def test_an_evicted_variant_memory_is_really_freed(tmp_path) -> None:
    """Real variants of a real checkpoint: after eviction nothing holds their expert tensors."""
    builder = VariantBuilder(save_random_model(moe_configs()["qwen3_moe"], tmp_path / "moe"))
    half = Selection("moe_experts", {layer: [0, 1, 2, 3] for layer in builder.sparse_layers})
    other = Selection("moe_experts", {layer: [4, 5, 6, 7] for layer in builder.sparse_layers})
    size = builder.variant_bytes(half)
    cache = VariantCache(budget=int(size * 1.5))
    first = cache.acquire(key("half"), size, lambda: builder.build(half))
    experts = weakref.ref(first.model.model.layers[0].mlp.experts.gate_up_proj)
    cache.release(first)
    del first
    cache.release(cache.acquire(key("other"), size, lambda: builder.build(other)))
    gc.collect()
    assert key("half") not in cache and cache.evictions == 1
    assert experts() is None, "an evicted variant's expert tensors are still alive"
    assert cache.resident_bytes == size


def test_a_failing_listener_strands_no_waiter() -> None:
    def broken(subject) -> None:
        raise RuntimeError("metrics down")

    cache = VariantCache(budget=1000, listener=CacheListener(hit=broken, miss=broken, built=broken, evicted=broken))
    build, gate = gated(lambda: Blob(100))
    results = []
    concurrently(lambda: results.append(cache.acquire(key("a"), 100, build)), 3, gate)
    assert len(results) == 3 and results[0].pins == 3


def test_a_big_variant_waiting_for_room_is_not_starved_by_small_ones() -> None:
    """Under a tight budget the full model, which needs the whole budget, got none of its requests through
    while small variants kept taking the room: the line for room is first come, first served."""
    cache = VariantCache(budget=100, wait=10)
    small = cache.acquire(VariantKey("small"), 40, lambda: "small")
    order: list[str] = []

    def big() -> None:
        variant = cache.acquire(VariantKey(None), 100, lambda: "full")
        order.append("full")
        time.sleep(0.05)
        cache.release(variant)

    def another_small() -> None:
        time.sleep(0.1)  # arrives after the big one started waiting
        variant = cache.acquire(VariantKey("small"), 40, lambda: "small")
        order.append("small")
        cache.release(variant)

    threads = [threading.Thread(target=big), threading.Thread(target=another_small)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert order == [], "the small request must queue behind the waiting big one, although its variant is cached"
    cache.release(small)
    for thread in threads:
        thread.join()
    assert order == ["full", "small"]
