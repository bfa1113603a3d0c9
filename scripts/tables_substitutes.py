"""The table of what stands in for a pruned expert (`bench/results/substitutes.json`, `eval_substitutes.py`)."""

from __future__ import annotations

from tables_pruning import TASKS, _mean, _pct, relative

from _results import load


def substitutes() -> str:
    report = load("substitutes.json")
    lines = [
        f"REAP selections (uniform budget), {report['n']} prompts per task of the choice seed {report['seed']}: "
        "greedy exact match (%); memory: the numbers a substitute stores per pruned expert, against the expert's own",
        "",
        "| model | kept | substitute | " + " | ".join(TASKS) + " | mean | of full | memory per pruned expert |",
        "|---|---|---|" + "---|" * (len(TASKS) + 3),
    ]
    for name, model in report["models"].items():
        full = model["full"]
        lines.append(
            f"| {name} | all | full model | " + " | ".join(_pct(full[t]) for t in TASKS)
            + f" | **{_pct(_mean(full))}** | 100.0 | |"
        )  # fmt: skip
        for keep, block in model["keeps"].items():
            for substitute, values in block["substitutes"].items():
                floats = model["substitute_floats"][substitute]
                share = f"{floats} ({100 * floats / model['expert_floats']:.2f}%)" if floats else "0"
                lines.append(
                    f"| {name} | {block['experts_kept']}/{block['of']} ({round(100 * float(keep), 1):g}%) | "
                    f"{substitute} | " + " | ".join(_pct(values[t]) for t in TASKS)
                    + f" | **{_pct(_mean(values))}** | {_pct(relative(values, full)[0])} | {share} |"
                )  # fmt: skip
    return "\n".join(lines) + "\n"
