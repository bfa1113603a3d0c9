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
from server.keep_search import (
    HELD_OUT_EVERY,
    MIN_HELD_OUT,
    candidate_counts,
    estimated_agreement,
    held_out_indices,
    held_out_needed,
    search_keep,
)
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
        return f"selection {count}", {"count": count}, 20 if count >= needed else 19

    # 19 of 20 held-out answers is a share of 95% but an estimate of 20/22 = 90.9%: short of 93%
    selection, record, search = search_keep(counts, evaluate, 0.93, held_out=20)
    assert search.experts == needed and len(asked) <= math.ceil(math.log2(len(counts)))
    assert 16 not in asked  # every expert meets any target: never evaluated
    assert search.estimate == pytest.approx(21 / 22) and search.matched == 20
    if needed < 16:
        assert selection == f"selection {needed}" and record == {"count": needed}
        assert search.tried[needed] == 1.0 and all(search.tried[c] == 0.95 for c in asked if c < needed)
    else:
        assert selection is None  # only the whole model: the caller keeps all


def test_the_estimate_is_the_rule_of_succession_and_asks_for_enough_held_out_prompts() -> None:
    assert estimated_agreement(127, 128) == pytest.approx(128 / 130) and estimated_agreement(0, 0) == 0.5
    for target in (0.5, 0.9, 0.95, 0.99, 0.999):
        needed = held_out_needed(target)  # the fewest prompts that all matching can show the target with
        assert estimated_agreement(needed, needed) >= target > estimated_agreement(needed - 1, needed - 1) or (
            needed == MIN_HELD_OUT
        )
    assert held_out_needed(0.99) == 98
    assert len(held_out_indices(4 * 98, 0.99)) == 98
    with pytest.raises(ValueError, match=r"at least 98 of them to show a target of 0.99 .* at least 392 prompts"):
        held_out_indices(4 * 98 - 1, 0.99)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        held_out_needed(1.0)


def test_held_out_prompts_and_the_recipe_refuse_what_cannot_work() -> None:
    assert held_out_indices(16) == [3, 7, 11, 15]
    with pytest.raises(ValueError, match="at least 16 prompts"):
        held_out_indices(15)
    assert PatternRecipe.for_model(True, keep="auto").target == 0.99
    refusals = (({"keep": "most"}, "keep"), ({"target": 0.9}, "target"), ({"keep": "auto", "target": 0.0}, "target"),
                ({"keep": "auto", "target": 1.0}, "target"))  # fmt: skip
    for kwargs, param in refusals:
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
    assert main([*args, "--prompts", str(prompts), "--keep", "auto", "--target", "0.95"]) == 2  # 8 held out
    assert "at least 18 of them to show a target of 0.95" in capsys.readouterr().err
    assert main([*args, "--prompts", str(prompts), "--keep", "auto", "--target", "0.85"]) == 0
    assert "keep auto:" in capsys.readouterr().out
    pattern = PatternStore(store).get("arith")
    searched = pattern.parameters["keep_search"]
    chosen, held = searched["experts"], 32 // HELD_OUT_EVERY
    assert pattern.parameters["keep"] == "auto" and pattern.parameters["target"] == 0.85
    assert pattern.parameters["keep_experts"] == chosen and searched["held_out"] == held
    assert all(len(kept) == chosen for kept in pattern.selection.layers.values())
    # 0.85 from 8 held out: every answer must match, (8 + 1) / (8 + 2) = 0.9; 7 of 8 is (7 + 1) / 10 = 0.8
    assert searched["matched"] == held and searched["estimate"] == pytest.approx(0.9)
    assert searched["tried"][str(chosen)] == 1.0
    assert all(share < 1.0 for count, share in searched["tried"].items() if int(count) < chosen)
    # the reference: the held-out prompts answered by the full model and by the chosen variant, as text
    builder = VariantBuilder(DEMO_MOE, dtype="float32")
    tokenizer = load_tokenizer(DEMO_MOE)
    held = [texts[i].prompt for i in held_out_indices(len(texts))]
    full = greedy_answers(builder.build(), tokenizer, held, max_new_tokens=64)
    variant = greedy_answers(builder.build(pattern.selection), tokenizer, held, max_new_tokens=64)
    matched = sum(a == b for a, b in zip(full, variant, strict=True))
    assert matched == searched["matched"] and searched["estimate"] == pytest.approx((matched + 1) / (len(held) + 2))
    assert pattern.calibration_prompts == len(texts) - len(held)  # the statistics never saw the held-out ones
    assert main([*args, "--prompts", str(prompts), "--keep", "auto", "--replace", "--target", "2"]) == 2
    with pytest.raises(SystemExit) as refused:  # argparse: a one-line usage error
        main([*args, "--prompts", str(prompts), "--keep", "lots"])
    assert refused.value.code == 2 and "or auto" in capsys.readouterr().err
