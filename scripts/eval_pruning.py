"""The pruning-accuracy table: task-specific pruning against generic pruning on the demo models.

    python scripts/eval_pruning.py [-n 200] [--out bench/results/pruning.json]

demo-moe, per task: the full model; TCESS at keep 50% and 25%; the raw-logit variant of the reference
code, selection frequency, task-agnostic TCESS (all tasks' prompts pooled) and random at the same keeps;
and the cross-task matrix (each task served by every task's TCESS pattern).
demo-dense: SEAP expert-based (per task) and general (pooled) at 20% and 50% sparsity, against weight
magnitude and random channel pruning. Accuracy is greedy exact match on held-out examples. Writes the
JSON and a Markdown rendering of the tables beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from server.demo.evaluate import EVAL_SEED, task_accuracy
from server.demo.tasks import TASK_NAMES, get_task
from server.model.calibrate import CalibrationStatistics
from server.model.pruning import dense_selection, keep_count, moe_selection
from server.model.variant import VariantBuilder
from server.patterns import CalibrationText, calibration_statistics, load_tokenizer

CALIBRATION_SEED = 7_000  # the demo stores' seed: neither training's nor the held-out evaluation's
MOE_KEEPS = (0.5, 0.25)
DENSE_SPARSITIES = (0.2, 0.5, 0.7)


def _accuracy(model, tokenizer, task: str, n: int) -> float:
    return task_accuracy(model, tokenizer, get_task(task).examples(n, EVAL_SEED))[task]


def _statistics(builder: VariantBuilder, tokenizer, prompts_per_task: int) -> dict[str, CalibrationStatistics]:
    return {
        task: calibration_statistics(
            builder,
            tokenizer,
            [CalibrationText(e.prompt, e.answer) for e in get_task(task).examples(prompts_per_task, CALIBRATION_SEED)],
        )
        for task in TASK_NAMES
    }


def _pooled(stats: dict[str, CalibrationStatistics]) -> CalibrationStatistics:
    values = list(stats.values())
    pooled = values[0]
    for other in values[1:]:
        pooled = pooled.merge(other)
    return pooled


def evaluate_moe(model_dir: Path, n: int, prompts_per_task: int) -> dict:
    builder = VariantBuilder(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    stats = _statistics(builder, tokenizer, prompts_per_task)
    pooled = _pooled(stats)
    num_experts = next(iter(builder.sparse_layers.values())).num_experts
    top_k = int(builder.config.num_experts_per_tok)
    full = builder.build()
    result: dict = {"full": {t: _accuracy(full, tokenizer, t, n) for t in tqdm(TASK_NAMES, desc="moe full")}}
    del full
    for keep in MOE_KEEPS:
        k = keep_count(num_experts, top_k, keep_ratio=keep)
        rows: dict[str, dict[str, float]] = {}
        for method in ("tcess", "tcess-logit", "frequency", "task-agnostic", "random"):
            rows[method] = {}
            for task in tqdm(TASK_NAMES, desc=f"moe keep {keep} {method}"):
                source = pooled if method == "task-agnostic" else stats[task]
                scorer = "tcess" if method == "task-agnostic" else method
                variant = builder.build(moe_selection(source, k, scorer, seed=TASK_NAMES.index(task)).selection)
                rows[method][task] = _accuracy(variant, tokenizer, task, n)
        cross = {}
        for pattern_task in tqdm(TASK_NAMES, desc=f"moe keep {keep} cross-task"):
            variant = builder.build(moe_selection(stats[pattern_task], k, "tcess").selection)
            cross[pattern_task] = {task: _accuracy(variant, tokenizer, task, n) for task in TASK_NAMES}
        result[f"keep_{keep}"] = {"experts_kept": k, "of": num_experts, "methods": rows, "cross_task": cross}
    return result


def evaluate_dense(model_dir: Path, n: int, prompts_per_task: int) -> dict:
    builder = VariantBuilder(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    stats = _statistics(builder, tokenizer, prompts_per_task)
    pooled = _pooled(stats)
    full = builder.build()
    result: dict = {"full": {t: _accuracy(full, tokenizer, t, n) for t in tqdm(TASK_NAMES, desc="dense full")}}
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


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    lines = []
    moe, dense = report["demo-moe"], report["demo-dense"]
    header = "| | " + " | ".join(TASK_NAMES) + " | mean |"
    rule = "|---|" + "---|" * (len(TASK_NAMES) + 1)

    def row(label: str, values: dict[str, float]) -> str:
        return f"| {label} | " + " | ".join(_pct(values[t]) for t in TASK_NAMES) + f" | **{_pct(_mean(values))}** |"

    lines += ["**demo-moe**: greedy exact match (%) on held-out examples, per task", "", header, rule]
    lines.append(row("full model (16 experts)", moe["full"]))
    for keep in MOE_KEEPS:
        block = moe[f"keep_{keep}"]
        for method, values in block["methods"].items():
            lines.append(row(f"{method}, keep {block['experts_kept']}/{block['of']}", values))
    for keep in MOE_KEEPS:
        block = moe[f"keep_{keep}"]
        lines += [
            "",
            f"**demo-moe cross-task, keep {block['experts_kept']}/{block['of']}**: rows are the pattern (TCESS of "
            "that task), columns the task served",
            "",
            "| pattern \\ task | " + " | ".join(TASK_NAMES) + " |",
            "|---|" + "---|" * len(TASK_NAMES),
        ]
        for pattern_task, values in block["cross_task"].items():
            lines.append(f"| {pattern_task} | " + " | ".join(_pct(values[t]) for t in TASK_NAMES) + " |")
    lines += ["", "**demo-dense**: greedy exact match (%) on held-out examples, per task", "", header, rule]
    lines.append(row("full model", dense["full"]))
    for sparsity in DENSE_SPARSITIES:
        for method, values in dense[f"sparsity_{sparsity}"]["methods"].items():
            lines.append(row(f"{method}, sparsity {int(100 * sparsity)}%", values))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("-n", type=int, default=200, help="held-out examples per task (default 200)")
    parser.add_argument("--prompts-per-task", type=int, default=64, help="calibration prompts per task")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pruning.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    report = {
        "settings": {"examples_per_task": args.n, "calibration_prompts_per_task": args.prompts_per_task},
        "demo-moe": evaluate_moe(args.models / "demo-moe", args.n, args.prompts_per_task),
        "demo-dense": evaluate_dense(args.models / "demo-dense", args.n, args.prompts_per_task),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
