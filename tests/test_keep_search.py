"""`--keep auto --target T` (`server.keep_search`): the fewest experts whose answers to held-out calibration
prompts match the full model's at least T of the time.

The search's logic is checked on a scripted agreement curve; the whole path on the demo model through the
CLI, against a reference that answers the held-out prompts with `demo.evaluate` (batched, decoded text),
not the search's own one-prompt-at-a-time token comparison."""

from __future__ import annotations

import json
import math

import pytest

from demo.calibration import calibration_texts
from demo.evaluate import greedy_answers
from pattern_store.store import PatternStore
from server.cli import main
from server.keep_search import HELD_OUT_EVERY, candidate_counts, held_out_indices, search_keep
from server.model.variant import VariantBuilder
from server.patterns import PatternRecipe, RecipeError, load_tokenizer

from conftest import DEMO_MOE


@pytest.mark.parametrize(
    ("experts", "top_k", "groups", "expected"),
    [
        (16, 2, 1, list(range(2, 17))),
        (64, 4, 1, list(range(4, 65, 4))),
        (64, 2, 1, [2, *range(4, 65, 4)]),
        (64, 8, 8, list(range(16, 65, 8))),  # group-limited: two per group at least, multiples of the groups
    ],
)
def test_the_grid_of_expert_counts(experts, top_k, groups, expected) -> None:
    assert candidate_counts(experts, top_k, groups) == expected


@pytest.mark.parametrize("needed", [2, 5, 11, 16])
def test_the_search_finds_the_fewest_experts_that_meet_the_target_in_log_steps(needed) -> None:
    counts = list(range(2, 17))
    asked: list[int] = []

    def evaluate(count: int):
        asked.append(count)
        return f"selection {count}", {"count": count}, 1.0 if count >= needed else 0.9

    selection, record, search = search_keep(counts, evaluate, 0.99, held_out=20)
    assert search.experts == needed and len(asked) <= math.ceil(math.log2(len(counts)))
    assert 16 not in asked  # every expert meets any target: never evaluated
    if needed < 16:
        assert selection == f"selection {needed}" and record == {"count": needed} and search.estimate == 1.0
        assert search.tried[needed] == 1.0 and all(search.tried[c] == 0.9 for c in asked if c < needed)
    else:
        assert selection is None and search.estimate == 1.0  # only the whole model: the caller keeps all


def test_held_out_prompts_and_the_recipe_refuse_what_cannot_work() -> None:
    assert held_out_indices(16) == [3, 7, 11, 15]
    with pytest.raises(ValueError, match="at least 16 prompts"):
        held_out_indices(15)
    assert PatternRecipe.for_model(True, keep="auto").target == 0.99
    for kwargs, param in (({"keep": "most"}, "keep"), ({"target": 0.9}, "target"),
                          ({"keep": "auto", "target": 0.0}, "target")):  # fmt: skip
        with pytest.raises(RecipeError) as refused:
            PatternRecipe.for_model(True, **kwargs)
        assert refused.value.param == param
    with pytest.raises(RecipeError, match="dense model"):
        PatternRecipe.for_model(False, keep="auto")


@pytest.mark.slow
def test_calibrate_keep_auto_records_the_count_and_an_estimate_a_reference_reproduces(tmp_path, capsys) -> None:
    texts = calibration_texts("arith", 32)
    prompts = tmp_path / "arith.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t.prompt, "response": t.response}) + "\n" for t in texts))
    store = tmp_path / "store"
    args = ["calibrate", "--model", str(DEMO_MOE), "--store", str(store), "--name", "arith", "--quiet"]
    assert main([*args, "--prompts", str(prompts), "--keep", "auto", "--target", "0.95"]) == 0
    assert "keep auto:" in capsys.readouterr().out
    pattern = PatternStore(store).get("arith")
    searched = pattern.parameters["keep_search"]
    chosen = searched["experts"]
    assert pattern.parameters["keep"] == "auto" and pattern.parameters["target"] == 0.95
    assert pattern.parameters["keep_experts"] == chosen and searched["held_out"] == 32 // HELD_OUT_EVERY
    assert all(len(kept) == chosen for kept in pattern.selection.layers.values())
    assert searched["estimate"] >= 0.95 and searched["tried"][str(chosen)] == searched["estimate"]
    assert all(share < 0.95 for count, share in searched["tried"].items() if int(count) < chosen)
    # the reference: the held-out prompts answered by the full model and by the chosen variant, as text
    builder = VariantBuilder(DEMO_MOE, dtype="float32")
    tokenizer = load_tokenizer(DEMO_MOE)
    held = [texts[i].prompt for i in held_out_indices(len(texts))]
    full = greedy_answers(builder.build(), tokenizer, held, max_new_tokens=64)
    variant = greedy_answers(builder.build(pattern.selection), tokenizer, held, max_new_tokens=64)
    assert searched["estimate"] == pytest.approx(sum(a == b for a, b in zip(full, variant, strict=True)) / len(held))
    assert pattern.calibration_prompts == len(texts) - len(held)  # the statistics never saw the held-out ones
    assert main([*args, "--prompts", str(prompts), "--keep", "auto", "--replace", "--target", "2"]) == 2
    with pytest.raises(SystemExit) as refused:  # argparse: a one-line usage error
        main([*args, "--prompts", str(prompts), "--keep", "lots"])
    assert refused.value.code == 2 and "or auto" in capsys.readouterr().err
