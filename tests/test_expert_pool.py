"""The expert pool: variants as router masks over shared expert slots, for every MoE family.

The reference for every row is today's pruned variant, built on its own by `VariantBuilder.build`: a row of
a mixed batch must compute its pattern's variant's logits (to float rounding: the pool adds the chosen
experts' outputs in slot order, the variant in expert order).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from pattern_store.selection import Selection, SelectionError
from server.batching import BatchedDecoder
from server.cache import VariantKey
from server.engine import Generation, SamplingParams
from server.errors import NoRoom
from server.expert_pool import ExpertPool
from server.model.kv_cache import cache_argument
from server.model.pooled import PooledModel, RowRoute
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_random_model

MOE = sorted(moe_configs())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-pool")
    return {name: save_random_model(config, root / name) for name, config in moe_configs().items()}


def _patterns(builder: VariantBuilder) -> dict[str, dict[int, tuple[int, ...]]]:
    """Three patterns that overlap in part, valid under every family's routing rule."""
    layers = sorted(builder.sparse_layers)
    if builder.family.balanced_groups(builder.config) > 1:  # two groups of four: the same number kept in each
        shapes = [(0, 1, 4, 5), (1, 2, 5, 6), (2, 3, 6, 7)]
    else:
        shapes = [(0, 1, 2), (2, 3, 4, 5), (5, 6, 7)]
    return {name: {layer: shapes[(i + j) % 3] for j, layer in enumerate(layers)} for i, name in enumerate("abc")}


def _route(name: str, kept: dict[int, tuple[int, ...]]) -> RowRoute:
    return RowRoute(name, kept)


def _inputs(seed: int, batch: int, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", MOE)
def test_each_row_of_a_mixed_batch_equals_its_patterns_variant(checkpoints, model_type) -> None:
    builder = VariantBuilder(checkpoints[model_type])
    pool = ExpertPool(PooledModel(builder, slots=8))
    patterns = _patterns(builder)
    leases = [pool.acquire(VariantKey(name), _route(name, kept)) for name, kept in patterns.items()]
    full = pool.acquire(VariantKey(None), RowRoute("full"))
    routes = [lease.route for lease in leases] + [full.route]
    x = _inputs(1, batch=len(routes))
    with torch.no_grad(), pool.pooled.rows(routes):
        mixed = pool.pooled.model(x).logits
    with torch.no_grad():
        for row, (name, kept) in enumerate(patterns.items()):
            variant = builder.build(Selection("moe_experts", {k: list(v) for k, v in kept.items()}))
            expected = variant(x[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], expected, rtol=1e-5, atol=1e-5, msg=f"pattern {name}")
        torch.testing.assert_close(mixed[-1], builder.build()(x[-1:]).logits[0], rtol=1e-5, atol=1e-5)
        # and the rows really differ: each is its own variant
        assert not torch.allclose(mixed[0], pool.pooled.routed(routes[1])(input_ids=x[:1]).logits[0], atol=1e-4)
    for lease in [*leases, full]:
        pool.release(lease)


def _distinct_patterns(builder: VariantBuilder, count: int, seed: int) -> list[dict[int, tuple[int, ...]]]:
    """`count` different patterns that the routing rule allows: random kept sets per layer (half the experts
    in each group where routing is group-limited, three to five experts elsewhere)."""
    rng = random.Random(seed)
    groups = builder.family.balanced_groups(builder.config)
    found: list[dict[int, tuple[int, ...]]] = []
    while len(found) < count:
        pattern = {}
        for layer, info in builder.sparse_layers.items():
            size = info.num_experts // groups
            if groups > 1:
                kept = [g * size + e for g in range(groups) for e in rng.sample(range(size), size // 2)]
            else:
                kept = rng.sample(range(info.num_experts), rng.randint(3, 5))
            pattern[layer] = tuple(sorted(kept))
        if pattern not in found:
            builder.kept_experts(Selection("moe_experts", {k: list(v) for k, v in pattern.items()}))
            found.append(pattern)
    return found


@pytest.mark.parametrize("model_type", MOE)
def test_eight_routes_in_one_batch_each_row_its_own_variant(checkpoints, model_type) -> None:
    """Eight distinct patterns and the full model in one forward pass (prefill and a decode step with the
    cache): every row computes its own pattern's standalone variant. The reference is each variant built on
    its own, whose router holds only its kept experts."""
    builder = VariantBuilder(checkpoints[model_type])
    pool = ExpertPool(PooledModel(builder, slots=8))
    patterns = _distinct_patterns(builder, 8, seed=sum(map(ord, model_type)))
    leases = [pool.acquire(VariantKey(f"p{i}"), _route(f"p{i}", kept)) for i, kept in enumerate(patterns)]
    full = pool.acquire(VariantKey(None), RowRoute("full"))
    routes = [lease.route for lease in leases] + [full.route]
    x = _inputs(7, batch=len(routes))
    step = _inputs(8, batch=len(routes), length=1)
    with torch.no_grad(), pool.pooled.rows(routes):
        prefill = pool.pooled.model(x, use_cache=True)
        decoded = pool.pooled.model(step, **cache_argument(pool.pooled.model, prefill.past_key_values)).logits
    with torch.no_grad():
        for row, kept in enumerate([*patterns, None]):
            selection = None if kept is None else Selection("moe_experts", {k: list(v) for k, v in kept.items()})
            variant = builder.build(selection)
            alone = variant(x[row : row + 1], use_cache=True)
            torch.testing.assert_close(prefill.logits[row], alone.logits[0], rtol=1e-5, atol=1e-5)
            after = variant(step[row : row + 1], **cache_argument(variant, alone.past_key_values)).logits
            # batched decoding rounds differently (the hybrids' linear attention: 8e-6 for the plain full model)
            torch.testing.assert_close(decoded[row], after[0], rtol=1e-5, atol=2e-5, msg=f"row {row}")
        # a batch of one pattern, routed by masks as a captured graph routes it, is that pattern's variant too
        pool.pooled.masked_only = True
        with pool.pooled.rows([routes[0]] * 2):
            alone = pool.pooled.model(x[:2]).logits
        variant = builder.build(Selection("moe_experts", {k: list(v) for k, v in patterns[0].items()}))
        torch.testing.assert_close(alone, variant(x[:2]).logits, rtol=1e-5, atol=1e-5)
    for lease in [*leases, full]:
        pool.release(lease)


@pytest.mark.parametrize("model_type", MOE)
def test_a_switch_loads_only_what_is_missing_and_evicted_experts_reload_correctly(checkpoints, model_type) -> None:
    builder = VariantBuilder(checkpoints[model_type])
    patterns = _patterns(builder)
    pool = ExpertPool(PooledModel(builder, slots=4))  # one pattern at a time fits, not two
    reader = builder.reader
    x = _inputs(2, batch=2)
    expected = {
        name: builder.build(Selection("moe_experts", {k: list(v) for k, v in kept.items()}))(x).logits.detach()
        for name, kept in patterns.items()
    }
    resident: dict[int, set[int]] = {layer: set() for layer in builder.sparse_layers}
    for name in ["a", "b", "a", "c", "a"]:
        kept = patterns[name]
        lacking = sum(len(set(kept[layer]) - resident[layer]) for layer in resident)
        before = reader.bytes_read
        lease = pool.acquire(VariantKey(name), _route(name, kept))
        per_expert = {layer: builder.expert_bytes(layer) for layer in resident}
        assert reader.bytes_read - before == sum(
            len(set(kept[layer]) - resident[layer]) * per_expert[layer] for layer in resident
        ), "a switch reads exactly the experts the pool lacks"
        assert lease.loaded == lacking
        with torch.no_grad():
            torch.testing.assert_close(lease.model(input_ids=x).logits, expected[name], rtol=1e-5, atol=1e-5)
        pool.release(lease)
        for layer in resident:  # what is resident now: this pattern's experts and what survived eviction
            resident[layer] = {e for e in range(8) if int(pool.pooled.slot_of[layer][e]) >= 0}
            assert set(kept[layer]) <= resident[layer]
            assert len(resident[layer]) <= 4
    assert pool.evicted_experts > 0
    report = {entry["pattern"]: entry for entry in pool.snapshot()["patterns"]}
    assert report["a"]["resident_fraction"] == 1.0 and report["a"]["missing_experts"] == {}
    absent = {int(layer): experts for layer, experts in report["b"]["missing_experts"].items()}
    assert absent and all(
        set(experts) == set(patterns["b"][layer]) - resident[layer] for layer, experts in absent.items()
    )


def test_a_cached_set_of_patterns_that_fits_evicts_nothing_when_cycled(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["qwen2_moe"])
    pool = ExpertPool(PooledModel(builder, slots=8))
    patterns = _patterns(builder)
    for _ in range(3):
        for name, kept in patterns.items():
            pool.release(pool.acquire(VariantKey(name), _route(name, kept)))
    assert pool.evicted_experts == 0
    assert pool.loaded_experts == sum(
        len(set().union(*(p[layer] for p in patterns.values()))) for layer in builder.sparse_layers
    )


def test_a_pattern_larger_than_the_slots_is_refused_for_good(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["qwen3_moe"])
    pool = ExpertPool(PooledModel(builder, slots=4), wait=5)
    started = time.monotonic()
    with pytest.raises(NoRoom, match="more than the pool's 4 slots") as refused:
        pool.acquire(VariantKey(None), RowRoute("full"))
    assert refused.value.permanent and time.monotonic() - started < 1


def test_pinned_experts_are_never_evicted_and_a_waiter_gets_room_when_a_lease_ends(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["qwen3_moe"])
    patterns = _patterns(builder)
    pool = ExpertPool(PooledModel(builder, slots=4), wait=0)
    held = pool.acquire(VariantKey("b"), _route("b", patterns["b"]))  # 4 experts per layer: all slots pinned
    with pytest.raises(NoRoom, match="do not fit beside"):
        pool.acquire(VariantKey("a"), _route("a", patterns["a"]))
    for layer, kept in patterns["b"].items():
        assert all(int(pool.pooled.slot_of[layer][e]) >= 0 for e in kept), "a refused request evicts nothing"
    threading.Timer(0.3, pool.release, args=(held,)).start()
    lease = pool.acquire(VariantKey("a"), _route("a", patterns["a"]), wait=10)
    pool.release(lease)


def test_concurrent_requests_for_the_same_experts_share_one_load(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["mixtral"])
    pool = ExpertPool(PooledModel(builder, slots=8))
    kept = _patterns(builder)["b"]
    before = builder.reader.bytes_read
    barrier = threading.Barrier(6)
    leases = []

    def lease() -> None:
        barrier.wait()
        leases.append(pool.acquire(VariantKey("b"), _route("b", kept)))

    threads = [threading.Thread(target=lease) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    per_layer = {layer: builder.expert_bytes(layer) for layer in builder.sparse_layers}
    assert builder.reader.bytes_read - before == sum(len(kept[layer]) * per_layer[layer] for layer in per_layer)
    assert pool.loaded_experts == sum(len(v) for v in kept.values())
    for item in leases:
        pool.release(item)


def test_the_pool_never_exceeds_its_slots_under_concurrent_mixed_load(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["olmoe"])
    patterns = _patterns(builder)
    pool = ExpertPool(PooledModel(builder, slots=5), wait=2)
    x = _inputs(3, batch=1)
    expected = {
        name: builder.build(Selection("moe_experts", {k: list(v) for k, v in kept.items()}))(x).logits.detach()
        for name, kept in patterns.items()
    }
    stop = threading.Event()
    samples: list[int] = []
    errors: list[BaseException] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(max(pool.used_slots().values()))
            time.sleep(0.001)

    def client(seed: int) -> None:
        chooser = random.Random(seed)
        try:
            for _ in range(12):
                name = chooser.choice("abc")
                try:
                    lease = pool.acquire(VariantKey(name), _route(name, patterns[name]))
                except NoRoom:
                    continue
                try:
                    with torch.no_grad():
                        got = lease.model(input_ids=x).logits
                    torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5)
                finally:
                    pool.release(lease)
        except BaseException as error:  # reported below
            errors.append(error)

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    stop.set()
    sampler.join()
    assert not errors, errors[0]
    assert samples and max(samples) <= 5
    assert pool.evicted_experts > 0, "the load should have forced evictions"


def test_a_failed_load_frees_its_slots_and_the_next_request_retries(checkpoints, monkeypatch) -> None:
    builder = VariantBuilder(checkpoints["qwen3_moe"])
    pooled = PooledModel(builder, slots=8)
    pool = ExpertPool(pooled)
    kept = _patterns(builder)["a"]
    original = pooled.load
    calls = []

    def failing(layer, experts, slots):
        calls.append(layer)
        if len(calls) == 1:
            raise OSError("disk went away")
        return original(layer, experts, slots)

    monkeypatch.setattr(pooled, "load", failing)
    with pytest.raises(Exception, match="disk went away"):
        pool.acquire(VariantKey("a"), _route("a", kept))
    assert all(not state.refs and not state.loading for state in pool.layers.values())
    lease = pool.acquire(VariantKey("a"), _route("a", kept))
    x = _inputs(4, batch=1)
    with torch.no_grad():
        expected = builder.build(Selection("moe_experts", {k: list(v) for k, v in kept.items()}))(x).logits
        torch.testing.assert_close(lease.model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    pool.release(lease)


def test_a_route_the_routing_rule_forbids_is_refused(checkpoints) -> None:
    """A pattern becomes a pool route through `kept_experts`, which checks it against the routing rule."""
    builder = VariantBuilder(checkpoints["deepseek_v3"])
    layer = sorted(builder.sparse_layers)[0]
    with pytest.raises(SelectionError, match="same number"):
        builder.kept_experts(Selection("moe_experts", {layer: [0, 1, 2, 4]}))


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_one_decoding_loop_serves_requests_of_different_patterns(checkpoints, model_type) -> None:
    """Greedy generations of three patterns decoded together in one batch equal each variant's own."""
    builder = VariantBuilder(checkpoints[model_type])
    pool = ExpertPool(PooledModel(builder, slots=8))
    patterns = _patterns(builder)

    class Tokens:  # the tiny models have no tokenizer: text is the ids
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = {"a": [3, 4, 5, 6], "b": [7, 8], "c": [9, 10, 11, 12, 13]}
    leases = {name: pool.acquire(VariantKey(name), _route(name, patterns[name])) for name in patterns}
    decoder = BatchedDecoder(pool.pooled.model, max_batch=8, pooled=pool.pooled)
    results: dict[str, list[int]] = {}

    def run(name: str) -> None:
        generation = Generation(leases[name].model, Tokens(), prompts[name], params)
        decoder.run(generation, route=leases[name].route)
        results[name] = generation.choices[0].ids

    threads = [threading.Thread(target=run, args=(name,)) for name in patterns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, kept in patterns.items():
        variant = builder.build(Selection("moe_experts", {k: list(v) for k, v in kept.items()}))
        alone = Generation(variant, Tokens(), prompts[name], params).run()
        assert results[name] == alone.choices[0].ids, name
        pool.release(leases[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pool_lives_on_the_gpu_and_loads_through_pinned_buffers(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["qwen3_moe"], device="cuda", dtype="bfloat16")
    pool = ExpertPool(PooledModel(builder, slots=4))
    kept = _patterns(builder)["a"]
    lease = pool.acquire(VariantKey("a"), _route("a", kept))
    layer = sorted(kept)[0]
    experts = pool.pooled.model.get_submodule(builder.sparse_layers[layer].prefix).experts
    assert experts.gate_up_proj.is_cuda and experts.gate_up_proj.dtype == torch.bfloat16
    x = _inputs(5, batch=1).cuda()
    with torch.no_grad():
        got = lease.model(input_ids=x).logits.float()
        variant = builder.build(Selection("moe_experts", {k: list(v) for k, v in kept.items()}))
        torch.testing.assert_close(got, variant(x).logits.float(), rtol=2e-2, atol=2e-2)
    pool.release(lease)


def test_a_request_waiting_for_room_is_served_before_later_ones(checkpoints) -> None:
    """First come, first served for room: a pattern that waits for slots is not passed by later requests,
    not even by ones whose experts are resident (they would keep the slots pinned forever under load)."""
    builder = VariantBuilder(checkpoints["qwen3_moe"])
    patterns = _patterns(builder)
    pool = ExpertPool(PooledModel(builder, slots=4), wait=10)
    held = pool.acquire(VariantKey("b"), _route("b", patterns["b"]))
    order: list[str] = []

    def lease(name: str, delay: float) -> None:
        time.sleep(delay)
        got = pool.acquire(VariantKey(name), _route(name, patterns[name]))
        order.append(name)
        time.sleep(0.05)
        pool.release(got)

    threads = [threading.Thread(target=lease, args=("a", 0.0)), threading.Thread(target=lease, args=("b", 0.1))]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert order == [], "b's experts are resident, but a waits ahead of it"
    pool.release(held)
    for thread in threads:
        thread.join()
    assert order == ["a", "b"]
