"""Novices (MoNE): a pruned expert the full router still chooses answers with its mean output on calibration.

The references are written here, apart from the code under test: the novices are each expert's outputs
recomputed from its weight matrices (the SwiGLU formula) and averaged over the tokens a hook saw the router
send to it; a variant with novices is checked against the full model whose experts module is replaced, token
by token and choice by choice, by "the chosen expert's own output if it is kept, else its novice", times the
full router's gate weight.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from pattern_store.pattern import PatternError, TaskPattern
from pattern_store.selection import Selection, SelectionError
from pattern_store.store import PatternStore
from pattern_store.substitutes import RIDGE, SAMPLES_PER_EXPERT, ExpertSamples
from server.cache import VariantKey
from server.expert_pool import ExpertPool
from server.model.answer_loss_refinement import AnswerLoss
from server.model.calibrate import collect_statistics
from server.model.export import ExportError, export_variant
from server.model.local_refinement import BlockReconstruction
from server.model.novices import NoviceMasks, NoviceTable, batch_term, novice_tables, pruned_rows
from server.model.pooled import PooledModel, RowRoute
from server.model.variant import VariantBuilder
from server.patterns import CalibrationSet, PatternRecipe, RecipeError, _kept_selection, select_experts

from tiny_models import moe_configs, save_random_model

#: families with different routers and experts: softmax top-k (Qwen3), sigmoid with groups and a selection bias
#: (DeepSeek-V3), experts with biases and a clamped GLU (gpt-oss), a router fed the bias by its block (MiniMax-M2)
FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss", "minimax_m2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, VariantBuilder]:
    root = tmp_path_factory.mktemp("novices")
    configs = moe_configs()
    return {name: VariantBuilder(save_random_model(configs[name], root / name)) for name in (*FAMILIES, "qwen2_moe")}


def _prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(length),), generator=generator).tolist() for length in range(6, 6 + n)]


KINDS = ("novice", "low-rank")
RANK = 3


def _novices(builder: VariantBuilder, kind: str = "novice", prompts: int = 5) -> dict[int, NoviceTable]:
    """Every expert's novice per layer, from calibration on the prompts (low-rank: rank `RANK`)."""
    rank = RANK if kind == "low-rank" else None
    stats = collect_statistics(builder, _prompts(prompts), batch_size=2, low_rank=rank)
    return {layer: NoviceTable(s.novices(), s.low_rank) for layer, s in stats.router.items()}


def _kept(builder: VariantBuilder) -> dict[int, tuple[int, ...]]:
    """Three of eight experts per layer, uneven over DeepSeek-V3's two groups: with novices the router keeps its
    own rule, so no group constraint applies."""
    return {layer: ((0, 1, 2), (1, 5, 6))[i % 2] for i, layer in enumerate(sorted(builder.sparse_layers))}


def _selection(builder: VariantBuilder, tables: dict[int, NoviceTable]) -> Selection:
    kept = _kept(builder)
    pruned = {layer: [e for e in range(8) if e not in k] for layer, k in kept.items()}
    return Selection(
        "moe_experts",
        kept,
        novices={layer: tables[layer].novices[rows] for layer, rows in pruned.items()},
        low_rank={layer: tables[layer].low_rank.rows(rows) for layer, rows in pruned.items() if tables[layer].low_rank},
    )


def _substitute(table: NoviceTable, expert: int, x: torch.Tensor) -> torch.Tensor:
    """f_j(x) = n_j + ((x - m_j) U_j) V_j^T, written out."""
    value = table.novices[expert].double()
    if table.low_rank is not None:
        maps = table.low_rank
        centred = x.double() - maps.means[expert].double()
        value = value + maps.outputs[expert].double() @ (maps.inputs[expert].double().T @ centred)
    return value


def _reduced_rank_ridge(x: torch.Tensor, y: torch.Tensor, rank: int) -> torch.Tensor:
    """[H, H]: the primal ridge solution of centred y on centred x (as augmented least squares), projected on the
    top `rank` right singular vectors of its fitted values."""
    xc, yc = (x - x.mean(0)).double(), (y - y.mean(0)).double()
    ridge = RIDGE * float(xc.square().sum()) / x.shape[1] + 1e-12
    augmented = torch.cat([xc, ridge**0.5 * torch.eye(x.shape[1], dtype=xc.dtype)])
    b = torch.linalg.lstsq(augmented, torch.cat([yc, torch.zeros(x.shape[1], y.shape[1], dtype=yc.dtype)])).solution
    top = torch.linalg.svd(xc @ b).Vh[:rank].T
    return b @ top @ top.T


def test_novices_are_each_experts_mean_output_and_low_rank_fit_on_the_tokens_routed_to_it(tiny) -> None:
    builder = tiny["qwen2_moe"]
    model = builder.build()
    pairs = {layer: {e: ([], []) for e in range(8)} for layer in builder.sparse_layers}

    def hook(layer: int):
        experts = model.get_submodule(builder.sparse_layers[layer].prefix).experts
        gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()
        half = gate_up.shape[1] // 2

        def on_experts(module, args, output) -> None:
            hidden, index = args[0].double(), args[1]
            for t in range(hidden.shape[0]):
                for e in index[t].tolist():
                    gate, up = gate_up[e, :half] @ hidden[t], gate_up[e, half:] @ hidden[t]
                    pairs[layer][e][0].append(hidden[t])
                    pairs[layer][e][1].append(down[e] @ (torch.nn.functional.silu(gate) * up))

        return on_experts

    handles = [
        model.get_submodule(info.prefix).experts.register_forward_hook(hook(layer))
        for layer, info in builder.sparse_layers.items()
    ]
    with torch.no_grad():
        for ids in _prompts(12):
            model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    tables = _novices(builder, "low-rank", prompts=12)
    for layer in builder.sparse_layers:
        for expert, (inputs, outputs) in pairs[layer].items():
            assert RANK < len(inputs) < SAMPLES_PER_EXPERT, "every token is in the sample, and enough for the fit"
            x, y = torch.stack(inputs), torch.stack(outputs)
            torch.testing.assert_close(tables[layer].novices[expert], y.mean(0).float(), rtol=1e-4, atol=1e-5)
            maps = tables[layer].low_rank
            torch.testing.assert_close(maps.means[expert], x.mean(0).float(), rtol=1e-4, atol=1e-5)
            product = maps.inputs[expert].double() @ maps.outputs[expert].double().T
            torch.testing.assert_close(product, _reduced_rank_ridge(x, y, RANK), rtol=1e-3, atol=1e-4)
            assert float(product.norm()) > 0


def test_the_token_sample_is_uniform_and_bounded() -> None:
    samples = ExpertSamples(num_experts=2, capacity=100, seed=1)
    for start in range(0, 10_000, 500):  # expert 0 sees tokens 0..9999 in order, expert 1 only the first 50
        ids = torch.arange(start, start + 500, dtype=torch.float32)
        experts = torch.where(ids < 50, torch.tensor(1), torch.tensor(0))
        rows = ids[:, None].expand(-1, 4)
        samples.add(experts, rows, rows)
    kept = torch.stack(samples.inputs[0])[:, 0]
    assert len(samples.inputs[0]) == 100 and samples.seen[0] == 10_000 - 50
    assert 4_000 < float(kept.mean()) < 6_000 and float(kept.max()) > 9_000  # spread over the whole stream
    assert len(samples.inputs[1]) == 50


def _reference(builder: VariantBuilder, kept: dict[int, tuple[int, ...]], tables: dict[int, NoviceTable]):
    """The full model whose experts modules answer each token's choices one by one: w * E_j(x) for a kept j (the
    experts module's forward run on that token alone, for that expert alone, at weight 1), else w * novice_j."""
    model = builder.build()

    def replace(layer: int):
        def on_experts(module, args, output):
            hidden, index, weights = args[0], args[1], args[2]
            rows = []
            for t in range(hidden.shape[0]):
                row = torch.zeros_like(hidden[t])
                for e, w in zip(index[t].tolist(), weights[t].tolist(), strict=True):
                    if e in kept[layer]:
                        one = module.forward(
                            hidden[t : t + 1], torch.tensor([[e]]), torch.ones(1, 1, dtype=hidden.dtype)
                        )[0]
                    else:
                        one = _substitute(tables[layer], e, hidden[t]).to(hidden.dtype)
                    row = row + w * one
                rows.append(row)
            return torch.stack(rows)

        return on_experts

    for layer, info in builder.sparse_layers.items():
        model.get_submodule(info.prefix).experts.register_forward_hook(replace(layer))
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_a_variant_with_novices_is_the_full_router_with_novices_for_its_pruned_experts(tiny, name, kind) -> None:
    builder = tiny[name]
    tables = _novices(builder, kind)
    selection = _selection(builder, tables)
    x = torch.tensor([_prompts()[-1]])
    with torch.no_grad():
        expected = _reference(builder, _kept(builder), tables)(x).logits
        variant = builder.build(selection)
        got = variant(x).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # what it reads: the kept experts only, the routers whole
        block = variant.get_submodule(builder.sparse_layers[min(builder.sparse_layers)].prefix)
        assert block.experts.experts.gate_up_proj.shape[0] == 3
        # the same on a model holding every expert, through the hooks the refinements score candidates with
        full = builder.build()
        masks = NoviceMasks(full, {i: info.prefix for i, info in builder.sparse_layers.items()}, tables)
        masks.apply(_kept(builder))
        with masks:
            torch.testing.assert_close(full(x).logits, expected, rtol=1e-4, atol=1e-5)
        unmasked = full(x).logits
        # and the novices matter: neither the full model nor zero novices compute it
        assert not torch.allclose(got, unmasked, atol=1e-3)
        zeros = {layer: torch.zeros_like(rows) for layer, rows in selection.novices.items()}
        silent = builder.build(Selection("moe_experts", _kept(builder), novices=zeros))(x).logits
        assert not torch.allclose(got, silent, atol=1e-3)
        if kind == "low-rank":  # and the maps matter: the novices alone do not compute it
            constant = builder.build(Selection("moe_experts", _kept(builder), novices=dict(selection.novices)))
            assert not torch.allclose(got, constant(x).logits, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "kind"), [("qwen3_moe", "novice"), ("deepseek_v3", "novice"), ("qwen3_moe", "low-rank")]
)
def test_pool_rows_with_novices_equal_their_variant_with_only_kept_experts_resident(tiny, name, kind) -> None:
    builder = tiny[name]
    selection = _selection(builder, _novices(builder, kind))
    other = _selection(builder, _novices(builder, "low-rank"))  # a second pattern with (low-rank) novices
    plain = {layer: (0, 1, 4, 5) for layer in builder.sparse_layers}  # a plain route sharing some experts
    union = {layer: len(set(_kept(builder)[layer]) | set(plain[layer])) for layer in builder.sparse_layers}
    pool = ExpertPool(PooledModel(builder, slots=max(union.values())))
    counts = {layer: info.num_experts for layer, info in builder.sparse_layers.items()}
    kept = builder.kept_experts(selection)

    def route(label: str, chosen: Selection) -> RowRoute:
        tables = novice_tables(chosen.novices, chosen.low_rank, kept, counts, builder.device, builder.dtype)
        return RowRoute(label, kept, novices=tables)

    leases = [
        pool.acquire(VariantKey("novice"), route("novice", selection)),
        pool.acquire(VariantKey("plain"), RowRoute("plain", plain)),
        pool.acquire(VariantKey("other"), route("other", other)),
    ]
    x = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(3))
    routes = [leases[0].route, leases[1].route, leases[0].route, leases[2].route]
    with torch.no_grad(), pool.pooled.rows(routes):
        mixed = pool.pooled.model(x).logits
    with torch.no_grad():
        expected = {
            "novice": builder.build(selection)(x[[0, 2]]).logits,
            "plain": builder.build(Selection("moe_experts", plain))(x[1:2]).logits,
            "other": builder.build(other)(x[3:]).logits,
        }
    torch.testing.assert_close(mixed[[0, 2]], expected["novice"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:2], expected["plain"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[3:], expected["other"], rtol=1e-5, atol=1e-5)
    for layer in builder.sparse_layers:  # the novice routes' pruned experts never needed a slot
        resident = set((pool.pooled.slot_of[layer] >= 0).nonzero().flatten().tolist())
        assert resident <= set(kept[layer]) | set(plain[layer])
    for lease in leases:
        pool.release(lease)


def test_a_layer_that_keeps_every_expert_beside_layers_with_novices_routes_as_it_is(tiny) -> None:
    """An adaptive or moved budget may give a layer all its experts; with novices elsewhere the pattern names
    only the pruned layers, builds, and answers as the reference (and its size is what the build holds)."""
    builder = tiny["qwen3_moe"]
    tables = _novices(builder, "low-rank")
    first, *rest = sorted(builder.sparse_layers)
    kept = {first: list(range(8)), **{layer: list(_kept(builder)[layer]) for layer in rest}}
    selection = _kept_selection(builder, kept, tables)
    assert set(selection.layers) == set(selection.novices) == set(rest)
    x = torch.tensor([_prompts()[-1]])
    with torch.no_grad():
        expected = _reference(builder, {**_kept(builder), first: tuple(range(8))}, tables)(x).logits
        variant = builder.build(selection)
        torch.testing.assert_close(variant(x).logits, expected, rtol=1e-4, atol=1e-5)
    assert builder.variant_bytes(selection) == _owned_bytes(builder, variant)


def _owned_bytes(builder: VariantBuilder, variant) -> int:
    """What a variant holds beyond the backbone a full model shares (its storages that are not the full model's)."""
    full = builder.build()
    held = {tensor.untyped_storage().data_ptr() for tensor in [*full.parameters(), *full.buffers()]}
    owned = {
        tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
        for tensor in [*variant.parameters(), *variant.buffers()]
        if tensor.untyped_storage().data_ptr() not in held
    }
    return sum(owned.values())


def test_a_patterns_table_holds_only_its_pruned_experts_rows_and_a_batch_reads_each_rows_own() -> None:
    """The pool's tables: one row per pruned expert (a kept expert costs nothing), indexed by expert id; a batch
    whose tokens follow two patterns and none reads each token's own table. The reference is written out
    choice by choice."""
    generator = torch.Generator().manual_seed(5)
    experts, hidden = 8, 6
    kept = {"a": [0, 3, 5], "b": [1, 2]}
    rows = {name: torch.randn(experts - len(k), hidden, generator=generator) for name, k in kept.items()}
    tables = {name: NoviceTable.of_pruned(rows[name], kept[name], experts) for name in kept}
    assert tables["a"].rows == 5 and tables["a"].width == experts
    assert tables["a"].nbytes == 5 * hidden * 4 + experts * (8 + 1)  # rows, row map (int64), substituted (bool)
    route_of_token = torch.tensor([0, 1, 0, 2, 1])  # 2: a row without novices
    chosen = torch.randint(0, experts, (5, 2), generator=generator)
    weights = torch.rand(5, 2, generator=generator)
    none = torch.zeros(experts, dtype=torch.bool)
    masks = [tables["a"].substituted, tables["b"].substituted, none]
    substituted = torch.stack([masks[r][chosen[t]] for t, r in enumerate(route_of_token.tolist())])
    hidden_states = torch.randn(5, hidden, generator=generator)
    tokens = [(route_of_token == route).nonzero().flatten() for route in (0, 1)]
    got = batch_term([tables["a"], tables["b"]], tokens, hidden_states, weights, chosen, substituted)
    expected = torch.zeros(5, hidden)
    for token, route in enumerate(route_of_token.tolist()):
        if route == 2:
            continue
        name = "ab"[route]
        pruned = [e for e in range(experts) if e not in kept[name]]
        for slot, expert in enumerate(chosen[token].tolist()):
            if expert in pruned:
                expected[token] += weights[token, slot] * rows[name][pruned.index(expert)]
    torch.testing.assert_close(got, expected)
    assert torch.equal(tables["b"].pruned_part(kept["b"]).novices, rows["b"])  # what a pattern stores, back
    with pytest.raises(ValueError, match="no novice"):
        tables["b"].pruned_part([1])  # expert 2 has no novice in b's table


def test_a_pool_that_served_a_novice_route_does_not_keep_its_tables_once_the_route_is_gone(tiny) -> None:
    """The pool's mask caches hold routes weakly: when a pattern is removed and its requests end, its novice
    tables (GBs at DeepSeek-V3's size) are freed, not kept until the caches turn over."""
    builder = tiny["qwen3_moe"]
    selection = _selection(builder, _novices(builder, "low-rank"))
    pool = ExpertPool(PooledModel(builder, slots=4))
    route = RowRoute("novice", builder.kept_experts(selection), novices=builder.novice_tables(selection))
    lease = pool.acquire(VariantKey("novice"), route)
    plain = pool.acquire(VariantKey("plain"), RowRoute("plain", {layer: (0, 1) for layer in builder.sparse_layers}))
    with torch.no_grad(), pool.pooled.rows([lease.route, plain.route]):  # a mixed batch: the masks are cached
        pool.pooled.model(torch.randint(3, 64, (2, 5)))
    pool.release(lease)
    pool.forget("novice")
    tables = [weakref.ref(table) for table in route.novices.values()]  # (their tensors are the selection's)
    del route, lease
    gc.collect()
    assert tables and all(table() is None for table in tables)


def test_a_pattern_stores_its_novices_in_its_tensor_file(tiny, tmp_path) -> None:
    builder = tiny["qwen3_moe"]
    selection = _selection(builder, _novices(builder, "low-rank"))
    pattern = TaskPattern("t", selection, {}, "reap", {"substitute": "novice"}, "fp", 0.0, 5)
    store = PatternStore(tmp_path / "store")
    store.add(pattern)
    loaded = PatternStore(tmp_path / "store").get("t")
    assert loaded.selection.substitute == "low-rank"
    for layer, rows in selection.novices.items():
        assert torch.equal(loaded.selection.novices[layer], rows)
        for part in ("means", "inputs", "outputs"):
            assert torch.equal(
                getattr(loaded.selection.low_rank[layer], part), getattr(selection.low_rank[layer], part)
            )
    document = json.loads((tmp_path / "store" / "patterns" / "t.json").read_text())
    assert document["selection"]["substitute"] == "low-rank"
    # the document alone cannot stand for the pattern: its novices are in the tensor file
    with pytest.raises(SelectionError, match="tensor file"):
        Selection.from_json(document["selection"])
    with pytest.raises(PatternError, match="novices"):
        TaskPattern.from_parts(document, {})
    with pytest.raises(SelectionError, match="every pruned layer"):
        Selection("moe_experts", {0: (0, 1)}, novices={1: torch.zeros(6, 4)})
    wrong = Selection("moe_experts", _kept(builder), novices={k: v[:, :3] for k, v in selection.novices.items()})
    with pytest.raises(SelectionError, match="novices of shape"):
        builder.build(wrong)
    with pytest.raises(ExportError, match="novices"):
        export_variant(builder, selection, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_refinement_scores_candidates_with_novices(tiny, kind) -> None:
    """The reconstruction error and the answer loss with novices are those of the variant with novices."""
    builder = tiny["qwen3_moe"]
    tables = _novices(builder, kind)
    layer = max(builder.sparse_layers)
    model = builder.build()
    block = model.get_submodule(builder.sparse_layers[layer].prefix)
    seen = {}
    handle = block.experts.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        model(torch.tensor([_prompts()[-1]]))
    handle.remove()
    reconstruction = BlockReconstruction(
        block, builder.family, builder.config, layer, seen["x"], seen["y"], tables[layer]
    )
    plain = BlockReconstruction(block, builder.family, builder.config, layer, seen["x"], seen["y"])
    masks = NoviceMasks(model, {layer: builder.sparse_layers[layer].prefix}, tables)
    for kept in [(0, 1, 2), (2, 5, 7)]:
        masks.apply({layer: kept})
        with masks, torch.no_grad():
            routed = block.experts(seen["x"], *reversed(block.gate(seen["x"])[1:]))
        expected = float((routed - seen["y"]).square().sum() / seen["y"].square().sum())
        assert reconstruction.error(kept) == pytest.approx(expected, rel=1e-4)
        assert reconstruction.error(kept) != pytest.approx(plain.error(kept), rel=1e-3)
    prompts = _prompts()
    starts = [len(ids) - 3 for ids in prompts]
    loss = AnswerLoss(builder, prompts, starts, batch_size=4, objective="answers", novices=tables)
    selection = _selection(builder, tables)
    variant = builder.build(selection)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, start in zip(prompts, starts, strict=True):
            logits = variant(torch.tensor([ids])).logits[0, start - 1 : -1].float()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[start:]), reduction="sum"))
            count += len(ids) - start
    assert loss.evaluate(_kept(builder)) == pytest.approx(total / count, rel=1e-5)


def test_a_recipe_with_novices_keeps_every_pruned_experts_novice(tiny) -> None:
    builder = tiny["deepseek_v3"]
    prompts = _prompts()
    stats = collect_statistics(builder, prompts, batch_size=2)
    recipe = PatternRecipe.for_model(True, keep_experts=3, refine="local", substitute="novice")
    pruned, _ = select_experts(builder, stats, recipe, CalibrationSet(prompts, [len(p) for p in prompts]))
    selection = pruned.selection
    assert selection.substitute == "novice" and recipe.parameters("moe_experts")["substitute"] == "novice"
    for layer, kept in selection.layers.items():
        assert len(kept) == 3  # three of eight: under groups of four, only novices allow an odd count
        torch.testing.assert_close(selection.novices[layer], pruned_rows(stats.router[layer].novices(), kept))
    builder.build(selection)
    with pytest.raises(RecipeError, match="dense model") as refused:
        PatternRecipe.for_model(False, substitute="novice")
    assert refused.value.param == "substitute"
    with pytest.raises(RecipeError, match="unknown substitute"):
        PatternRecipe.for_model(True, substitute="merge")


@pytest.mark.parametrize("kind", KINDS)
def test_variant_bytes_of_a_pattern_with_novices_equal_what_its_build_holds(tiny, kind) -> None:
    builder = tiny["deepseek_v3"]
    selection = _selection(builder, _novices(builder, kind))
    assert builder.variant_bytes(selection) == _owned_bytes(builder, builder.build(selection)) > 0
