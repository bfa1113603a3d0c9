"""Tables of `scripts/bench_store_changes.py` (`bench/results/store_changes.json`) and
`scripts/bench_fit_placement.py` (`bench/results/fit_placement.json`) for the docs."""

from __future__ import annotations

from _results import Report, load

TARGETS = {
    "churn_vs_quiet_slowest_routed": ("slowest routed request, churn vs quiet (medians of the phases' maxima)", "x"),
    "routed_non_200_under_churn": ("routed answers other than 200, under churn", ""),
    "reproducer_non_200": ("the routed-404 reproducer: answers other than 200", ""),
    "damaged_warning_seconds": ("a damaged file: seconds to its warning (slowest file and server)", " s"),
    "damaged_listed_by_admin_store": ("a damaged file listed by `GET /admin/store`", ""),
    "damaged_named_503_pattern_damaged": ("a named request for it: 503 `pattern_damaged` with the reason", ""),
    "restored_serve_200": ("repaired, it serves again", ""),
    "cut_streams_max_tokens_after_cut": ("streams cut by their clients: most tokens generated after a cut", ""),
    "cut_streams_counted_once": ("streams cut: counted once in `taskmoe_generations_cancelled_total`", ""),
}


def _value(value: object, unit: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def store_changes(report: Report | None = None) -> str:
    """The load phases and the issue's targets."""
    report = report if report is not None else load("store_changes.json")
    s, load_report = report["settings"], report["load"]
    lines = [
        f"{s['servers']} `taskmoe serve` processes on one store (shipped defaults, `--store-poll` "
        f"{s['store_poll_s']:g} s), "
        f"{s['load_clients']} clients sending routed requests of {s['max_tokens']['load']} tokens, {s['seconds']} s "
        f"phases; in churn phases a pattern is imported on one server and the previous one deleted on the other "
        f"every {s['churn_every_s']:g} s; {s['cpus']} CPUs.",
        "",
        "| phase | routed requests | non-200 | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for phase in load_report["phases"]:
        lines.append(
            f"| {phase['kind']} | {phase['requests']} | {phase['non_200']} | {phase['p50_ms']:.0f} | "
            f"{phase['p99_ms']:.0f} | {phase['max_ms']:.0f} |"
        )
    lines += ["", "| target | measured | threshold | met |", "|---|---|---|---|"]
    for name, target in report["targets"].items():
        what, unit = TARGETS.get(name, (name, ""))
        measured, threshold = _value(target["measured"], unit), _value(target["target"], unit)
        lines.append(f"| {what} | {measured} | {threshold} | {'yes' if target['pass'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def fit_placement(report: Report | None = None) -> str:
    """Routed latency while the router is fitted without pause, by where the fit runs."""
    report = report if report is not None else load("fit_placement.json")
    where = {
        "quiet": "no fit",
        "thread": "fits on a lower-priority thread of the server",
        "process": "fits in a lower-priority process (`FittingProcess`, what the server does)",
    }
    lines = ["| while | requests | p50 ms | p99 ms | max ms | fits |", "|---|---|---|---|---|---|"]
    for condition, row in report["conditions"].items():
        lines.append(
            f"| {where.get(condition, condition)} | {row['requests']} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
            f"{row['max_ms']:.0f} | {row['fits'] or ''} |"
        )
    return "\n".join(lines) + "\n"
