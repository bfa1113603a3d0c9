"""Refinement of expert selections: the losses it minimises are the real ones, and its searches keep their word.

Every loss is checked against an independent computation: the reconstruction error against the masked
block's own output, the answer loss against the cross-entropy of the built variant or its KL divergence from
the full model (`torch.nn.functional.kl_div` over the whole vocabulary, which the tiny models' 64 tokens are).
"""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pattern_store.selection import Selection
from server.model.answer_loss_refinement import TOP_TOKENS, AnswerLoss, refine_by_answer_loss
from server.model.layer_stream import LayerStream
from server.model.local_refinement import BlockReconstruction, SearchOptions, refine_locally
from server.model.masking import RouterMasks
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_random_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, VariantBuilder]:
    root = tmp_path_factory.mktemp("refine")
    configs = moe_configs()
    return {
        name: VariantBuilder(save_random_model(configs[name], root / name)) for name in ("qwen2_moe", "deepseek_v3")
    }


def _prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(length),), generator=generator).tolist() for length in range(7, 7 + n)]


def _block_sample(builder: VariantBuilder, layer: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, object]:
    """A full model, and one MoE block's inputs and routed outputs on the prompts."""
    model = builder.build()
    block = model.get_submodule(builder.sparse_layers[layer].prefix)
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        seen["x"], seen["y"] = args[0], output

    handle = block.experts.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.tensor([_prompts()[-1]]))
    handle.remove()
    return block, seen["x"], seen["y"], model


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_reconstruction_error_is_the_masked_blocks_error(tiny, name) -> None:
    builder = tiny[name]
    layer = max(builder.sparse_layers)
    block, x, y, model = _block_sample(builder, layer)
    reconstruction = BlockReconstruction(block, builder.family, builder.config, layer, x, y)
    everything = tuple(range(builder.sparse_layers[layer].num_experts))
    assert reconstruction.error(everything) == pytest.approx(0.0, abs=1e-10)
    masks = RouterMasks(model, builder.family, builder.config, {layer: builder.sparse_layers[layer].prefix})
    for kept in [(0, 1, 4, 5), (2, 3, 6, 7), (0, 3, 4, 7)]:
        masks.apply({layer: kept})
        with masks, torch.no_grad():
            pruned = block.experts(x, *reversed(block.gate(x)[1:]))
        expected = float((pruned - y).square().sum() / y.square().sum())
        assert reconstruction.error(kept) == pytest.approx(expected, rel=1e-4)
        assert expected > 0
    if name == "deepseek_v3":  # two groups of four: an uneven selection breaks group-limited routing
        assert math.isinf(reconstruction.error((0, 1, 2, 4)))


def test_swap_search_ends_where_no_single_swap_helps(tiny) -> None:
    builder = tiny["qwen2_moe"]
    layer = 1
    block, x, y, _ = _block_sample(builder, layer)
    reconstruction = BlockReconstruction(block, builder.family, builder.config, layer, x, y)
    experts = range(builder.sparse_layers[layer].num_experts)
    errors = {kept: reconstruction.error(kept) for kept in itertools.combinations(experts, 3)}
    worst = max(errors, key=errors.get)
    scores = torch.zeros(len(experts))
    kept, error, swaps = reconstruction.search(worst, scores, SearchOptions(candidates=8, max_swaps=20))
    assert swaps > 0 and error < errors[worst] and error == pytest.approx(errors[kept])
    for out, add in itertools.product(kept, [e for e in experts if e not in kept]):
        neighbour = tuple(sorted({*kept, add} - {out}))
        assert errors[neighbour] >= error * (1 - 1e-6), "a single swap would still help"
    assert error <= sorted(errors.values())[len(errors) // 4], "the search lands among the best quarter of sets"


def test_local_refinement_starts_from_the_best_method_and_never_worsens(tiny) -> None:
    """Each layer starts from the method that reconstructs it best, on tokens that came through the refined
    layers before it: recomputed here with the refined selection of the earlier layers masked in."""
    builder = tiny["qwen2_moe"]
    starts = {
        "first": dict.fromkeys(builder.sparse_layers, (0, 1, 2)),
        "last": dict.fromkeys(builder.sparse_layers, (5, 6, 7)),
    }
    tiebreak = {layer: torch.arange(8.0) for layer in builder.sparse_layers}
    seen = []
    result = refine_locally(builder, _prompts(), starts, tiebreak, batch_size=4, progress=seen.append)
    assert seen == list(range(1, builder.config.num_hidden_layers + 1))
    assert set(result) == set(builder.sparse_layers)
    assert any(search.swaps for search in result.values())
    model = builder.build()
    sparse = {index: layer.prefix for index, layer in builder.sparse_layers.items()}
    masks = RouterMasks(model, builder.family, builder.config, sparse)
    for layer, search in result.items():
        assert len(search.kept) == 3
        assert search.start_loss == min(search.method_losses.values()) == search.method_losses[search.start]
        assert search.loss <= search.start_loss
        block = model.get_submodule(sparse[layer])
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = block.experts.register_forward_hook(lambda m, a, o, seen=captured: seen.append((a[0], o)))
        masks.apply({earlier: result[earlier].kept for earlier in result if earlier < layer})
        with masks, torch.no_grad():
            for prompt in _prompts():
                model(torch.tensor([prompt]))
        handle.remove()
        x, y = torch.cat([c[0] for c in captured]), torch.cat([c[1] for c in captured])
        reference = BlockReconstruction(block, builder.family, builder.config, layer, x, y)
        for method, selection in starts.items():
            assert reference.error(selection[layer]) == pytest.approx(search.method_losses[method], rel=1e-4)


def _cross_entropy(model, prompts: list[list[int]], starts: list[int]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, start in zip(prompts, starts, strict=True):
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(ids[1:])
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            total += float(losses[start - 1 :].sum())
            count += len(ids) - start
    return total / count


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_answer_loss_is_the_built_variants_cross_entropy(tiny, name) -> None:
    builder = tiny[name]
    prompts = _prompts()
    starts = [len(ids) - 3 for ids in prompts]
    loss = AnswerLoss(builder, prompts, starts, batch_size=4, objective="answers")
    first = {layer: (0, 1, 4, 5) for layer in builder.sparse_layers}
    second = {**first, max(first): (2, 3, 6, 7)}
    for selection in (first, second):
        expected = _cross_entropy(builder.build(Selection("moe_experts", selection)), prompts, starts)
        assert loss.evaluate(selection) == pytest.approx(expected, rel=1e-5)
    # the cache of layer inputs: fill it for `first` up to the last sparse layer, then change an early layer;
    # a cache that kept the old inputs would score `third` with `first`'s early layers
    last, early = max(first), min(first)
    loss.set(first)
    assert loss.evaluate(second, from_layer=last) == pytest.approx(
        _cross_entropy(builder.build(Selection("moe_experts", second)), prompts, starts), rel=1e-5
    )
    changed = {**first, early: (1, 2, 5, 6)}
    loss.set(changed, changed_from=early)
    third = {**changed, last: (2, 3, 6, 7)}
    expected = _cross_entropy(builder.build(Selection("moe_experts", third)), prompts, starts)
    assert loss.evaluate(third, from_layer=last) == pytest.approx(expected, rel=1e-5)
    assert loss.evaluate({}) == pytest.approx(_cross_entropy(builder.build(), prompts, starts), rel=1e-5)
    with pytest.raises(ValueError, match="answer tokens"):
        AnswerLoss(builder, prompts, [len(ids) for ids in prompts])
    with pytest.raises(ValueError, match="unknown answer-loss objective"):
        AnswerLoss(builder, prompts, starts, objective="perplexity")


def _divergence(variant, prompts: list[list[int]], starts: list[int], full) -> float:
    """KL(full || variant) of the next-token distributions at the answer positions, per answer token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, start in zip(prompts, starts, strict=True):
            x = torch.tensor([ids])
            p = full(x).logits[0, start - 1 : -1].float().log_softmax(-1)
            q = variant(x).logits[0, start - 1 : -1].float().log_softmax(-1)
            total += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
            count += len(ids) - start
    return total / count


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_answer_loss_is_the_built_variants_divergence_from_the_full_model(tiny, name) -> None:
    builder = tiny[name]
    assert builder.config.vocab_size <= TOP_TOKENS, "the reference below is the KL over the whole vocabulary"
    prompts = _prompts()
    starts = [len(ids) - 3 for ids in prompts]
    loss = AnswerLoss(builder, prompts, starts, batch_size=4)
    full = builder.build()
    assert loss.evaluate({}) == pytest.approx(0.0, abs=1e-6)
    for selection in (
        {layer: (0, 1, 4, 5) for layer in builder.sparse_layers},
        {max(builder.sparse_layers): (2, 3, 6, 7)},
    ):
        expected = _divergence(builder.build(Selection("moe_experts", selection)), prompts, starts, full)
        assert expected > 1e-4
        assert loss.evaluate(selection) == pytest.approx(expected, rel=1e-4)


def test_answer_loss_search_beats_its_best_candidate(tiny) -> None:
    builder = tiny["qwen2_moe"]
    prompts = _prompts(8, seed=3)
    starts = [len(ids) - 4 for ids in prompts]
    candidates = {
        "a": dict.fromkeys(builder.sparse_layers, tuple([0, 1, 2])),
        "b": dict.fromkeys(builder.sparse_layers, tuple([3, 4, 5])),
    }
    tiebreak = {layer: torch.arange(8.0) for layer in builder.sparse_layers}
    passes = []
    options = SearchOptions(e2e_objective="answers")
    search = refine_by_answer_loss(builder, prompts, starts, candidates, tiebreak, options, passes.append)
    assert search.start == min(search.candidate_losses, key=search.candidate_losses.get)
    assert search.stopped in {"converged", "evaluations"}
    assert search.loss <= search.start_loss and search.swaps > 0
    assert search.evaluations == passes[-1] and search.evaluations > len(candidates)
    assert all(len(kept) == 3 for kept in search.kept.values())
    expected = _cross_entropy(builder.build(Selection("moe_experts", search.kept)), prompts, starts)
    assert search.loss == pytest.approx(expected, rel=1e-5), "the reported loss is the chosen selection's"
    assert search.full_loss == pytest.approx(_cross_entropy(builder.build(), prompts, starts), rel=1e-5)


def test_layer_stream_keeps_each_rows_prompt() -> None:
    """Batches are sorted by length; each row must still know its prompt (answer positions depend on it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(moe_configs()["qwen3_moe"]).eval()
    prompts = _prompts(5)[::-1]
    stream = LayerStream(model, prompts, batch_size=2)
    for batch in stream.batches:
        for row, prompt in enumerate(batch.prompts):
            assert batch.ids[row, : len(prompts[prompt])].tolist() == prompts[prompt]
    assert sorted(p for batch in stream.batches for p in batch.prompts) == list(range(5))


def test_answer_loss_search_stops_at_its_budget_of_forward_passes(tiny) -> None:
    builder = tiny["qwen2_moe"]
    prompts = _prompts(8, seed=3)
    starts = [len(ids) - 4 for ids in prompts]
    candidates = {"a": dict.fromkeys(builder.sparse_layers, (0, 1, 2))}
    tiebreak = {layer: torch.arange(8.0) for layer in builder.sparse_layers}
    search = refine_by_answer_loss(builder, prompts, starts, candidates, tiebreak, SearchOptions(e2e_evaluations=5))
    assert search.stopped == "evaluations" and search.evaluations <= 5 + SearchOptions().e2e_pairs


def _lopsided_model(builder: VariantBuilder, directory: Path, quiet: int) -> VariantBuilder:
    """The tiny model with the routed experts of sparse layer `quiet` writing a hundredth of what they did:
    dropping experts there costs almost nothing, so a budget moved by the loss must take slots from it."""
    tensors = load_file(builder.model_dir / "model.safetensors")
    marked = f"layers.{quiet}.mlp.experts"
    scaled = [name for name in tensors if marked in name and "down_proj" in name]
    assert scaled, "the checkpoint names its routed experts' down projections"
    for name in scaled:
        tensors[name] = tensors[name] * 0.01
    shutil.copytree(builder.model_dir, directory)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return VariantBuilder(directory)


def test_moved_budget_takes_slots_from_the_layer_that_needs_them_least(tiny, tmp_path) -> None:
    quiet = max(tiny["qwen2_moe"].sparse_layers)
    builder = _lopsided_model(tiny["qwen2_moe"], tmp_path / "lopsided", quiet)
    prompts = _prompts(8, seed=3)
    starts = [len(ids) - 4 for ids in prompts]
    candidates = {"a": dict.fromkeys(builder.sparse_layers, (0, 1, 2, 3))}
    tiebreak = {layer: torch.arange(8.0) for layer in builder.sparse_layers}
    fixed = refine_by_answer_loss(builder, prompts, starts, candidates, tiebreak)
    moved = refine_by_answer_loss(builder, prompts, starts, candidates, tiebreak, move_budget=True)
    assert fixed.moves == 0 and all(len(kept) == 4 for kept in fixed.kept.values())
    # moves stop when none lowers the loss, well before the budget of forward passes (a move kept without
    # lowering it would go on until that budget ran out)
    assert moved.moves > 0 and moved.stopped == "converged"
    counts = {layer: len(kept) for layer, kept in moved.kept.items()}
    assert sum(counts.values()) == 4 * len(counts), "the total budget stays"
    assert min(counts.values()) >= int(builder.config.num_experts_per_tok), "no layer below the routing's top-k"
    assert counts[quiet] < 4 and max(counts.values()) > 4, counts
    assert moved.loss < fixed.loss
    variant = builder.build(Selection("moe_experts", moved.kept))
    # a small divergence magnifies float32 rounding (padded batches against one prompt at a time)
    assert moved.loss == pytest.approx(_divergence(variant, prompts, starts, builder.build()), rel=1e-3)


def test_group_limited_swaps_stay_in_their_group(tiny) -> None:
    """DeepSeek-V3 with two groups of four: only swaps within a group keep the groups balanced."""
    builder = tiny["deepseek_v3"]
    layer = max(builder.sparse_layers)
    block, x, y, _ = _block_sample(builder, layer)
    reconstruction = BlockReconstruction(block, builder.family, builder.config, layer, x, y)
    kept = (0, 1, 4, 5)
    ranked = reconstruction.ranked_swaps(kept, torch.arange(8.0), candidates=4)
    assert len(ranked) == 8  # 2 x 2 pairs in each of the two groups
    for error, swapped in ranked:
        assert math.isfinite(error)
        assert sum(e < 4 for e in swapped) == 2 and sum(e >= 4 for e in swapped) == 2


def test_moved_budget_is_refused_where_routing_keeps_expert_groups_balanced(tiny) -> None:
    """DeepSeek-V3's groups need the same count in each: one slot cannot move, so the recipe says so up front."""
    from server.model.calibrate import collect_statistics
    from server.patterns import PatternRecipe, select_experts

    builder = tiny["deepseek_v3"]
    stats = collect_statistics(builder, _prompts())
    recipe = PatternRecipe(method="reap", keep_ratio=0.5, budget="loss", refine="e2e")
    with pytest.raises(ValueError, match="expert groups"):
        select_experts(builder, stats, recipe, None)
