"""The pruning-accuracy tables: which experts (or channels) to keep, measured on the demo models.

    python scripts/eval_pruning.py [-n 200] [--models models] [--out bench/results/pruning.json]
    python scripts/eval_pruning.py --only demo-moe-fine --keeps 0.25      # one model, one keep level

For every MoE demo model (`demo-moe`, 16 experts top-2; `demo-moe-fine`, 64 experts top-4 and a shared
expert) and keep levels 50%, 25% and 12.5% of the routed experts, per task:

- every scoring method (TCESS, its raw-logit variant, selection frequency, REAP, EAN, EASY-EP), the
  task-agnostic baseline (TCESS over all tasks' prompts pooled) and random;
- REAP with the adaptive per-layer budget;
- the refinements: layer-local (reconstruction error) and end to end (the divergence from the full model on
  the calibration answers), the latter with the uniform budget and with the budget moved between layers by
  that loss, with the seconds each pattern took to calibrate and the memory its kept experts take;
- the same REAP, answer-loss and moved-budget recipes with novices (`--substitute novice`: a pruned expert the
  full router still chooses adds its mean calibration output, times its gate weight), and what the novices
  cost in memory;
- the cross-task matrix of the best recipe (every task served by every task's pattern).

For `demo-dense`: SEAP expert-based (per task) and general (pooled) against weight magnitude and random at
20%, 50% and 70% channel sparsity. Patterns are calibrated on 64 prompts per task with their answers
(seed 7000) and judged by greedy exact match on held-out examples (the evaluation seed, never trained on and
never calibrated on). Writes the JSON, and the docs' tables are rendered from it
(`python scripts/render_docs.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from demo.calibration import CALIBRATION_SEED, calibration_texts
from demo.evaluate import EVAL_SEED, task_accuracy
from demo.tasks import TASK_NAMES, get_task
from pattern_store.recipes import DEFAULT_RANK, MOE_METHODS
from pattern_store.selection import Selection
from server.model.calibrate import CalibrationStatistics, collect_statistics
from server.model.pruning import dense_selection, keep_count, moe_selection
from server.model.variant import VariantBuilder
from server.patterns import (
    CalibrationSet,
    PatternRecipe,
    calibration_set,
    load_tokenizer,
    max_context,
    select_experts,
)

import _measured

MOE_MODELS = ("demo-moe", "demo-moe-fine")
MOE_KEEPS = (0.5, 0.25, 0.125)
DENSE_SPARSITIES = (0.2, 0.5, 0.7)
#: the recipes beyond plain scoring: (row label, method, layer budget, refinement, substitute)
REFINED = (
    ("reap, adaptive budget", "reap", "adaptive", "none", "none"),
    ("layer-local refinement", "reap", "uniform", "local", "none"),
    ("answer-loss refinement", "reap", "uniform", "e2e", "none"),
    ("answer-loss refinement, moved budget", "reap", "loss", "e2e", "none"),
    ("reap, novices", "reap", "uniform", "none", "novice"),
    ("answer-loss refinement, novices", "reap", "uniform", "e2e", "novice"),
    ("answer-loss refinement, moved budget, novices", "reap", "loss", "e2e", "novice"),
    ("reap, low-rank novices", "reap", "uniform", "none", "low-rank"),
    ("answer-loss refinement, low-rank novices", "reap", "uniform", "e2e", "low-rank"),
)
BEST = "answer-loss refinement, moved budget"


def _accuracy(model: Any, tokenizer: Any, task: str, n: int) -> float:
    return task_accuracy(model, tokenizer, get_task(task).examples(n, EVAL_SEED))[task]


def _calibration(builder: VariantBuilder, tokenizer: Any, prompts_per_task: int) -> dict[str, CalibrationSet]:
    return {
        task: calibration_set(tokenizer, calibration_texts(task, prompts_per_task), max_context(builder))
        for task in TASK_NAMES
    }


def _pooled(stats: dict[str, CalibrationStatistics]) -> CalibrationStatistics:
    values = list(stats.values())
    pooled = values[0]
    for other in values[1:]:
        pooled = pooled.merge(other)
    return pooled


def evaluate_moe(
    model_dir: Path, n: int, prompts_per_task: int, keeps: tuple[float, ...], recipes: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Every row at every keep level (`recipes`: only those rows of `REFINED`, no scoring rows, no cross-task)."""
    builder = VariantBuilder(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    calibration = _calibration(builder, tokenizer, prompts_per_task)
    stats, statistics_seconds = {}, {}
    for task in TASK_NAMES:
        started = time.perf_counter()
        stats[task] = collect_statistics(builder, calibration[task].token_ids, low_rank=DEFAULT_RANK)
        statistics_seconds[task] = time.perf_counter() - started
    pooled = _pooled(stats)
    num_experts = next(iter(builder.sparse_layers.values())).num_experts
    top_k = int(builder.config.num_experts_per_tok)
    full = builder.build()
    result: dict[str, Any] = {
        "experts": num_experts,
        "top_k": top_k,
        "full": {t: _accuracy(full, tokenizer, t, n) for t in tqdm(TASK_NAMES, desc=f"{model_dir.name} full")},
    }
    del full
    for keep in keeps:
        k = keep_count(num_experts, top_k, keep_ratio=keep)
        rows: dict[str, dict[str, float]] = {}
        seconds: dict[str, dict[str, float]] = {}
        layer_counts: dict[str, dict[str, dict[str, int]]] = {}
        selections: dict[str, dict[str, Selection]] = {}
        scoring = [*(m for m in MOE_METHODS if m != "random"), "task-agnostic", "random"] if recipes is None else []
        for method in scoring:
            rows[method] = {}
            for task in tqdm(TASK_NAMES, desc=f"{model_dir.name} keep {keep} {method}"):
                source = pooled if method == "task-agnostic" else stats[task]
                scorer = "tcess" if method == "task-agnostic" else method
                selection = moe_selection(source, k, scorer, seed=TASK_NAMES.index(task)).selection
                rows[method][task] = _accuracy(builder.build(selection), tokenizer, task, n)
        for label, method, budget, refine, substitute in REFINED:
            if recipes is not None and label not in recipes:
                continue
            rows[label], seconds[label], selections[label], layer_counts[label] = {}, {}, {}, {}
            recipe = PatternRecipe(method=method, keep_ratio=keep, budget=budget, refine=refine, substitute=substitute)
            for task in tqdm(TASK_NAMES, desc=f"{model_dir.name} keep {keep} {label}"):
                started = time.perf_counter()
                pruned, _ = select_experts(builder, stats[task], recipe, calibration[task])
                # the whole calibration of the pattern: the statistics pass and the selection with its refinement
                seconds[label][task] = round(time.perf_counter() - started + statistics_seconds[task], 1)
                selections[label][task] = pruned.selection
                layer_counts[label][task] = {str(k): len(v) for k, v in pruned.selection.layers.items()}
                rows[label][task] = _accuracy(builder.build(pruned.selection), tokenizer, task, n)
        cross = {}
        for pattern_task in tqdm(TASK_NAMES if BEST in selections else [], desc=f"{model_dir.name} keep {keep} cross"):
            variant = builder.build(selections[BEST][pattern_task])
            cross[pattern_task] = {task: _accuracy(variant, tokenizer, task, n) for task in TASK_NAMES}
        result[f"keep_{keep}"] = {
            "experts_kept": k,
            "of": num_experts,
            "methods": rows,
            "refinement_seconds": seconds,
            "experts_per_layer": layer_counts,
            # what a pattern's kept experts take (every recipe keeps the same total), and its novices when it has
            # them: one vector of the hidden size per pruned expert per layer, in the model's dtype
            "kept_expert_bytes": sum(builder.sizes.expert_bytes(i) for i in builder.sparse_layers) * k,
            "all_expert_bytes": sum(builder.sizes.expert_bytes(i) for i in builder.sparse_layers) * num_experts,
            "novice_bytes": len(builder.sparse_layers) * (num_experts - k) * int(builder.config.hidden_size) * 4,
            # a low-rank novice also keeps its inputs' mean and the rank-r factors U and V: (2 r + 2) vectors
            "low_rank_bytes": len(builder.sparse_layers)
            * (num_experts - k)
            * int(builder.config.hidden_size)
            * 4
            * (2 * DEFAULT_RANK + 2),
            "cross_task_recipe": BEST,
            "cross_task": cross,
        }
    return result


def evaluate_dense(model_dir: Path, n: int, prompts_per_task: int) -> dict[str, Any]:
    builder = VariantBuilder(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    calibration = _calibration(builder, tokenizer, prompts_per_task)
    stats = {task: collect_statistics(builder, calibration[task].token_ids) for task in TASK_NAMES}
    pooled = _pooled(stats)
    full = builder.build()
    result: dict[str, Any] = {
        "width": builder.dense_layers[0].intermediate,
        "hidden": int(builder.config.hidden_size),
        "full": {t: _accuracy(full, tokenizer, t, n) for t in tqdm(TASK_NAMES, desc="dense full")},
    }
    for sparsity in DENSE_SPARSITIES:
        rows: dict[str, dict[str, float]] = {}
        for method in ("seap-expert", "seap-general", "magnitude", "random"):
            rows[method] = {}
            for task in tqdm(TASK_NAMES, desc=f"dense sparsity {sparsity} {method}"):
                source = pooled if method == "seap-general" else stats[task]
                scorer = "seap" if method.startswith("seap") else method
                selection = dense_selection(source, builder, sparsity, scorer, seed=TASK_NAMES.index(task)).selection
                rows[method][task] = _accuracy(builder.build(selection), tokenizer, task, n)
        result[f"sparsity_{sparsity}"] = {"methods": rows}
    return result


def _with_rows(earlier: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """A model's keep levels measured for some recipes, with the rows of the other recipes an earlier run of
    the same file measured kept beside them (the per-recipe tables of each level merged)."""
    merged = dict(measured)
    for key, block in measured.items():
        before = earlier.get(key)
        if not key.startswith("keep_") or not isinstance(before, dict):
            continue
        merged[key] = {**before, **block}
        for part in ("methods", "refinement_seconds", "experts_per_layer"):
            merged[key][part] = {**before.get(part, {}), **block.get(part, {})}
        if not block.get("cross_task"):  # this run measured no cross-task matrix: the earlier one stays
            for part in ("cross_task", "cross_task_recipe"):
                if part in before:
                    merged[key][part] = before[part]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("-n", type=int, default=200, help="held-out examples per task (default 200)")
    parser.add_argument("--prompts-per-task", type=int, default=64, help="calibration prompts per task")
    parser.add_argument("--only", choices=[*MOE_MODELS, "demo-dense"], help="evaluate one model, keep the others")
    parser.add_argument("--keeps", type=float, nargs="+", default=list(MOE_KEEPS), help="MoE keep levels")
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=[label for label, *_ in REFINED],
        help="only these recipe rows (no scoring rows, no cross-task matrix; give another --out; with --only, the "
        "file's other rows of the model stay)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/pruning.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread is fastest for these small models, and the numbers repeat
    report: dict[str, Any] = {"models": {}}
    report["settings"] = {
        "examples_per_task": args.n,
        "calibration_prompts_per_task": args.prompts_per_task,
        "calibration_seed": CALIBRATION_SEED,
        "evaluation_seed": EVAL_SEED,
        "torch_threads": 1,
    }
    for name in MOE_MODELS:
        if (args.only in (None, name)) and (args.models / name).is_dir():
            started = time.perf_counter()
            recipes = tuple(args.recipes) if args.recipes else None
            measured = evaluate_moe(args.models / name, args.n, args.prompts_per_task, tuple(args.keeps), recipes)
            measured["seconds"] = round(time.perf_counter() - started, 1)
            report["models"][name] = measured
    if args.only in (None, "demo-dense") and not args.recipes:
        started = time.perf_counter()
        report["dense"] = evaluate_dense(args.models / "demo-dense", args.n, args.prompts_per_task)
        report["dense"]["seconds"] = round(time.perf_counter() - started, 1)
    report["measured"] = _measured.measured()
    if args.recipes:
        report["recipes"] = args.recipes
    if args.only:  # the other models' results are the file's when this run ends (runs of two models compose)
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        if "dense" in previous and "dense" not in report:
            report["dense"] = previous["dense"]
        models = previous.get("models", {})  # a model measured here keeps its other keep levels
        if args.recipes:  # and with --recipes, its other recipes' rows
            report["models"] = {name: _with_rows(models.get(name, {}), m) for name, m in report["models"].items()}
        report["models"] = {**models, **{name: {**models.get(name, {}), **m} for name, m in report["models"].items()}}
        report["measured"] |= {"only": args.only, "rest": previous.get("measured")}
        if args.recipes:
            report["measured"]["recipes"] = args.recipes
            if "recipes" in previous:  # a file of some recipes' rows gains these; a whole file stays whole
                earlier = previous["recipes"]
                report["recipes"] = [*earlier, *(recipe for recipe in args.recipes if recipe not in earlier)]
            else:
                report.pop("recipes", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}; render the docs' tables with: python scripts/render_docs.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
