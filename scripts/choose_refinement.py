"""How the demo stores' recipe was chosen: the answer-loss refinement's objective and layer budget, on a choice split.

    python scripts/choose_refinement.py [--model models/demo-moe] [-n 200] [--keeps 0.5 0.25]

Every demo task is calibrated on its 64 calibration exchanges (seed 7000) with REAP and the answer-loss
refinement five ways: the cross-entropy of the answers (the refinement's earlier objective), the divergence
from the full model with the uniform budget, the divergence with the budget moved by it (`--budget loss`), and
the last two with novices for the pruned experts (`--substitute novice`). Each pattern answers `-n` prompts of
the choice seed 8100 (the diagnosis seed: neither calibration's nor the evaluation seed that `eval_pruning.py`
and `eval_served.py` report on), greedy, exact match. The demo stores use the recipe that wins here; the
reported figures come from the other seeds. Writes `bench/results/refinement_choice.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

#: (row label, objective of the answer loss, layer budget, substitute for the pruned experts)
RECIPES = (
    ("cross-entropy, uniform", "answers", "uniform", "none"),
    ("divergence, uniform", "divergence", "uniform", "none"),
    ("divergence, moved budget", "divergence", "loss", "none"),
    ("divergence, uniform, novices", "divergence", "uniform", "novice"),
    ("divergence, moved budget, novices", "divergence", "loss", "novice"),
)


def main(argv: list[str] | None = None) -> int:
    import torch
    from tqdm import tqdm

    from demo.calibration import calibration_texts
    from demo.evaluate import task_accuracy
    from demo.tasks import CHOICE_SEED, TASK_NAMES, get_task
    from server.model.calibrate import collect_statistics
    from server.model.local_refinement import SearchOptions
    from server.model.variant import VariantBuilder
    from server.patterns import PatternRecipe, calibration_set, load_tokenizer, max_context, select_experts

    from _measured import measured

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-moe")
    parser.add_argument("-n", type=int, default=200, help="choice-split prompts per task")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "refinement_choice.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    builder = VariantBuilder(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    full = builder.build()
    report: dict[str, Any] = {"model": args.model.name, "seed": CHOICE_SEED, "n": args.n, "full": {}, "keeps": {}}
    calibrations, stats = {}, {}
    for task in TASK_NAMES:
        calibrations[task] = calibration_set(tokenizer, calibration_texts(task, 64), max_context(builder))
        stats[task] = collect_statistics(builder, calibrations[task].token_ids)
        examples = get_task(task).examples(args.n, CHOICE_SEED)
        report["full"][task] = task_accuracy(full, tokenizer, examples)[task]
    for keep in args.keeps:
        rows: dict[str, Any] = {}
        for label, objective, budget, substitute in RECIPES:
            rows[label] = {}
            search = SearchOptions(e2e_objective=objective)
            recipe = PatternRecipe(
                method="reap", keep_ratio=keep, budget=budget, refine="e2e", search=search, substitute=substitute
            )
            for task in tqdm(TASK_NAMES, desc=f"keep {keep} {label}"):
                started = time.perf_counter()
                pruned, record = select_experts(builder, stats[task], recipe, calibrations[task])
                seconds = time.perf_counter() - started
                examples = get_task(task).examples(args.n, CHOICE_SEED)
                rows[label][task] = {
                    "accuracy": task_accuracy(builder.build(pruned.selection), tokenizer, examples)[task],
                    "experts_per_layer": record["experts_per_layer"],
                    "moves": record["e2e"]["moves"],
                    "seconds": round(seconds, 1),
                }
        report["keeps"][str(keep)] = rows
        full_mean = sum(report["full"].values()) / len(TASK_NAMES)
        for label, per_task in rows.items():
            mean = sum(r["accuracy"] for r in per_task.values()) / len(TASK_NAMES)
            print(f"keep {keep} {label:<34} mean {100 * mean:.1f}% ({100 * mean / full_mean:.1f}% of full) "
                  + " ".join(f"{t} {100 * r['accuracy']:.1f}" for t, r in per_task.items()))  # fmt: skip
    report["measured"] = measured()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
