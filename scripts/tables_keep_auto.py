"""Tables of `scripts/eval_keep_auto.py` (`bench/results/keep_auto.json`): how many experts `--keep auto`
chooses per demo task, and whether the search's estimate holds on the evaluation seed."""

from __future__ import annotations

from demo.tasks import CHOICE_SEED

from _results import Report, load


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _estimate(row: dict) -> str:
    """The estimate, with the held-out answers it came from where the file has them (rule of succession)."""
    if "matched" not in row:  # the raw share of matching answers (the search before the rule of succession)
        return _percent(row["estimate"])
    return f"{_percent(row['estimate'])} ({row['matched']} of {row['held_out']})"


def _memory(row: dict, substitute: str) -> str:
    """The experts' memory the pattern takes; a file from before the field: the kept share (exact for a
    pattern without substitutes and one count in every layer)."""
    if "memory" in row:
        return _percent(row["memory"])
    return _percent(row["experts"] / row["of"]) if substitute == "none" else ""


def keep_auto(report: Report | None = None) -> str:
    report = report if report is not None else load("keep_auto.json")
    settings = report["settings"]
    target = settings["target"]
    seed = settings.get("seed")
    split = "the choice split (seed 8100)" if seed == CHOICE_SEED else "the evaluation seed"
    substitute = settings.get("substitute", "none")
    rule = (
        "(matched + 1) / (held out + 2)"
        if any("matched" in row for entry in report["models"].values() for row in entry["tasks"].values())
        else "the share of held-out answers equal to the full model's"
    )
    lines = [
        f"`--keep auto --target {target}`, refinement `{settings['refine']}`, budget "
        f"`{settings.get('budget', 'uniform')}`"
        + (f", substitute `{substitute}`" if substitute != "none" else "")
        + f", on {settings['prompts']} calibration exchanges per task (a quarter held out by the search; "
        f"estimate: {rule}); accuracy on {settings['n']} examples of {split}, which neither the statistics "
        "nor the search saw.",
        "",
        "| model | task | experts kept | memory (of all experts) | estimate (held-out answers as the full model's) "
        "| accuracy | full model | retained | estimate - retained, points | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in report["models"].items():
        for task, row in entry["tasks"].items():
            error = "" if row["estimate_error"] is None else f"{100 * row['estimate_error']:+.1f}"
            lines.append(
                f"| {model} | {task} | {row['experts']} of {row['of']} | {_memory(row, substitute)} | "
                f"{_estimate(row)} | "
                f"{_percent(row['accuracy'])} | {_percent(row['full_accuracy'])} | {_percent(row['retention'])} | "
                f"{error} | {row['seconds']:.0f} |"
            )
    lines += ["", "| model | target | met? | tasks that meet it |", "|---|---|---|---|"]
    names = {
        "every_task_retained": (f"every task keeps at least {100 * target:.0f}%", "retained"),
        "fewer_than_half_on_half_the_tasks": ("fewer than half the experts on half the tasks", "fewer_than_half"),
        "estimate_within_1.5_points": ("the estimate within 1.5 points", "estimate_within"),
        "at_most_5_minutes": ("at most 5 minutes a pattern", None),
    }
    for model, entry in report["models"].items():
        verdict = entry["verdict"]
        for key, (label, listed) in names.items():
            tasks = ", ".join(verdict[listed]) if listed else f"slowest {verdict['slowest_seconds']:.0f} s"
            lines.append(f"| {model} | {label} | {'met' if verdict['met'][key] else 'missed'} | {tasks} |")
    return "\n".join(lines) + "\n"


def keep_auto_seconds(report: Report | None = None) -> str:
    """`scripts/bench_keep_auto_time.py`: each pattern's wall time through `taskmoe calibrate` alone."""
    report = report if report is not None else load("keep_auto_seconds.json")
    settings, limit = report["settings"], report["limit_seconds"]
    lines = [
        f"`taskmoe calibrate --keep auto --target {settings['target']} --refine {settings['refine']}`"
        + (f" `--substitute {settings['substitute']}`" if settings["substitute"] != "none" else "")
        + f" on {settings['prompts']} calibration exchanges per task, one pattern at a time on a quiet machine "
        "(wall seconds, loading included, torch's default threads).",
        "",
        "| model | task | experts kept | seconds |",
        "|---|---|---|---|",
    ]
    for model, entry in report["models"].items():
        for task, row in entry["tasks"].items():
            over = " (over)" if row["seconds"] > limit else ""
            lines.append(f"| {model} | {task} | {row['experts']} of {row['of']} | {row['seconds']:.0f}{over} |")
    lines += ["", f"| model | at most {limit / 60:.0f} minutes a pattern | slowest |", "|---|---|---|"]
    for model, entry in report["models"].items():
        lines.append(f"| {model} | {'met' if entry['met'] else 'missed'} | {entry['slowest_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"
