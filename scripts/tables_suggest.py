"""Tables of `scripts/eval_suggest.py` (`bench/results/suggest.json`): does a suggestion find the task left out
of the store, and does a pattern calibrated from it serve that task."""

from __future__ import annotations

from _results import Report, load


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def _found(report: Report) -> list[str]:
    lines = [
        "| task set | task left out | its queries that fell back | suggestion holding most of them: size | "
        "recall (target 80%) | purity (target 90%) | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, per in report["report"].items():
        for task, entry in per.items():
            met = "yes" if entry["met"] else ("no queries fell back" if not entry["fell_back"] else "no")
            lines.append(
                f"| {kind} | {task} | {entry['fell_back']} of {report['queries']} | {entry['cluster_size']} | "
                f"{_percent(entry['recall'])} | {_percent(entry['purity'])} | {met} |"
            )
    return lines


def _calibrated(report: Report) -> list[str]:
    lines = [
        "| demo task | prompts calibrated on | new prompts routed to the new pattern (target 90%) | "
        "accuracy, suggested pattern | accuracy, shipped pattern | gap, points (target <= 1) |",
        "|---|---|---|---|---|---|",
    ]
    for task, entry in report["calibrated"].items():
        if not entry.get("calibrated"):
            lines.append(f"| {task} | no suggestion | | | | |")
            continue
        accuracy = entry["accuracy"]
        lines.append(
            f"| {task} | {entry['calibration_prompts']} | {_percent(entry['routed_to_new_pattern'])} | "
            f"{_percent(accuracy['suggested'])} | {_percent(accuracy['shipped'])} | "
            f"{entry['accuracy_gap_points']:.0f} |"
        )
    return lines


def suggestions(report: Report | None = None) -> str:
    report = report if report is not None else load("suggest.json")
    choice = ", ".join(f"{d}: {v['met']} met" for d, v in report["choose"].items())
    intro = (
        f"{report['queries']} prompts of every task a split; the clustering cut at cosine distance "
        f"**{report['merge_chosen']}**, chosen on the choice split (tasks meeting both targets per distance: "
        f"{choice}); the tables are the report split."
    )
    return "\n".join([intro, "", *_found(report), "", *_calibrated(report)]) + "\n"
