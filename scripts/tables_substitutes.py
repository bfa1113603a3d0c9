"""The tables of what stands in for a pruned expert: the choice-split comparison (`substitutes.json`,
`eval_substitutes.py`) and the low-rank novices on the evaluation seed (`pruning_low_rank.json`,
`eval_pruning.py --recipes`)."""

from __future__ import annotations

from tables_pruning import TASKS, _levels, _mean, _pct, relative

from pattern_store.recipes import DEFAULT_RANK

from _results import load

#: the low-rank recipe the README's headline quotes (`eval_pruning.py`'s row)
LOW_RANK_ROW = "answer-loss refinement, low-rank novices"


def _memory_share(kept: int, of: int, expert: float, substitute: float) -> str:
    """The kept experts and every pruned expert's substitute, as a share of all the experts' memory."""
    return f"{100 * (kept * expert + (of - kept) * substitute) / (of * expert):.1f}%"


def _full_row(name: str, full: dict[str, float], columns: int) -> str:
    return (
        f"| {name} | all | full model | " + " | ".join(_pct(full[t]) for t in TASKS)
        + f" | **{_pct(_mean(full))}** | 100.0 |" + " |" * columns
    )  # fmt: skip


def substitutes() -> str:
    report = load("substitutes.json")
    lines = [
        f"REAP selections (uniform budget), {report['n']} prompts per task of the choice seed {report['seed']}: "
        "greedy exact match (%). Memory: the numbers a substitute stores per pruned expert, against the expert's "
        "own; and the kept experts with every pruned expert's substitute, as a share of all the experts",
        "",
        "| model | kept | substitute | " + " | ".join(TASKS) + " | mean | of full | per pruned expert | memory |",
        "|---|---|---|" + "---|" * (len(TASKS) + 4),
    ]
    for name, model in report["models"].items():
        full, expert = model["full"], model["expert_floats"]
        lines.append(_full_row(name, full, 2))
        for keep, block in model["keeps"].items():
            kept, of = block["experts_kept"], block["of"]
            for substitute, values in block["substitutes"].items():
                floats = model["substitute_floats"][substitute]
                share = f"{floats} ({100 * floats / expert:.1f}%)" if floats else "0"
                lines.append(
                    f"| {name} | {kept}/{of} ({round(100 * float(keep), 1):g}%) | {substitute} | "
                    + " | ".join(_pct(values[t]) for t in TASKS)
                    + f" | **{_pct(_mean(values))}** | {_pct(relative(values, full)[0])} | {share} | "
                    f"{_memory_share(kept, of, expert, floats)} |"
                )
    return "\n".join(lines) + "\n"


def pruning_low_rank() -> str:
    report = load("pruning_low_rank.json")
    settings = report["settings"]
    lines = [
        f"Greedy exact match (%) on {settings['examples_per_task']} held-out examples per task of the evaluation "
        f"seed; rank {DEFAULT_RANK} (the default). Memory: the kept experts and the novices (or low-rank novices), "
        "as a share of all the experts; slowest: the seconds the slowest task's pattern took to calibrate",
        "",
        "| model | kept | recipe | " + " | ".join(TASKS) + " | mean | of full | worst task | memory | slowest s |",
        "|---|---|---|" + "---|" * (len(TASKS) + 5),
    ]
    for name, model in report["models"].items():
        full = model["full"]
        lines.append(_full_row(name, full, 3))
        for key in _levels(model):
            block = model[key]
            for recipe, values in block["methods"].items():
                share, worst = relative(values, full)
                extra = block["low_rank_bytes"] if "low-rank" in recipe else block["novice_bytes"]
                memory = (block["kept_expert_bytes"] + extra) / block["all_expert_bytes"]
                slowest = max(block["refinement_seconds"][recipe].values())
                lines.append(
                    f"| {name} | {block['experts_kept']}/{block['of']} | {recipe} | "
                    + " | ".join(_pct(values[t]) for t in TASKS)
                    + f" | **{_pct(_mean(values))}** | {_pct(share)} | {_pct(worst)} | {100 * memory:.1f}% | "
                    f"{slowest:.0f} |"
                )
    return "\n".join(lines) + "\n"
