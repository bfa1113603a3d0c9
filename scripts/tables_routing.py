"""Tables and findings of `scripts/eval_routing.py` (`bench/results/routing.json`) for the docs."""

from __future__ import annotations

from _results import Report, load

COLUMNS = ("own", "union", "wrong", "wrong-union", "fallback")
SERVED = "served (defaults)"


def routing_settings() -> str:
    """How the routing evaluation was set up, from the report's settings."""
    s = load("routing.json")["settings"]
    return (
        f"The first {s['examples_per_task']} prompts of each of the {len(s['tasks'])} benchmark files "
        f"({', '.join(s['tasks'])}) are the patterns' routing examples; the other {s['queries']:,} prompts are "
        f"routed with the server's defaults (`--route-threshold {s['route_threshold']:g}`, "
        f"`--route-union {s['route_union']}`, `--route-novelty {s['route_novelty']:g}`).\n"
    )


def routing() -> str:
    """Where unseen benchmark prompts go, per router (share of queries, %)."""
    report = load("routing.json")
    lines = [
        "| router | own pattern | union with own | wrong pattern | union without own | fallback |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in report["results"].items():
        cells = " | ".join(f"{row[k]:.1f}" for k in COLUMNS)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def route_p50(report: Report) -> str:
    """One routing decision's p50 as served, with the other thread counts and the part outside the embedder."""
    threads = report.get("route_ms_p50_by_threads", {})
    p90 = f", p90 {report['route_ms_p90']:.1f} ms" if "route_ms_p90" in report else ""
    return (
        f"{report['route_ms_p50']:.1f} ms (1 thread, as served{p90})"
        + "".join(f"; {v:.1f} ms with {n} threads" for n, v in threads.items() if str(n) != "1")
        + (
            f"; {report['decide_ms_p50']:.1f} ms {_outside(report)} outside the embedder"
            if "decide_ms_p50" in report
            else ""
        )
    )


def _outside(report: Report) -> str:
    """Whose decision `decide_ms_p50` is: every decision's, or (two stages) an embedded query's."""
    return "of an embedded query's decision" if "first_stage_agreement" in report else "of it"


def routing_targets() -> str:
    """The targets, met or missed, with the served router's figures, and where each absent task goes."""
    report = load("routing.json")
    served = report["results"][SERVED]
    measured = {
        "wrong routes <= 2%": f"{served['wrong'] + served['wrong-union']:.1f}%",
        "own or union >= 93%": f"{served['own'] + served['union']:.1f}%",
        "full fallback <= 5%": f"{served['fallback']:.1f}%",
        "leave-one-task-out wrong single <= 35%": f"{report['leave_one_task_out_wrong_single_mean']:.1f}%",
        "routing p50 <= 15 ms": route_p50(report),
        "routing p50 <= 5 ms": route_p50(report),
    }
    lines = ["| target | measured | result |", "|---|---|---|"]
    for target, ok in report["targets"].items():
        lines.append(f"| {target} | {measured[target]} | {'met' if ok else '**missed**'} |")
    lines += [
        "",
        "| absent task | to a wrong single pattern | to a union | to the fallback | mostly to |",
        "|---|---|---|---|---|",
    ]
    for task, row in report["leave_one_task_out"].items():
        most = row["most_to"][0][0] if row["most_to"] else "-"
        lines.append(f"| {task} | {row['single']:.1f} | {row['union']:.1f} | {row['fallback']:.1f} | {most} |")
    return "\n".join(lines) + "\n"


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.0f}%" if round(low) == round(high) else f"{low:.0f}-{high:.0f}%"


def _union_cost(report: Report) -> str:
    """What share of a model's experts (dense: channels) one pattern and a union of two keep, per demo store."""
    parts = []
    for store, kept in report.get("union_kept_percent", {}).items():
        single = [v for name, v in kept.items() if "+" not in name]
        pair = [v for name, v in kept.items() if "+" in name]
        parts.append(f"`{store}`: one pattern {_span(single)}, a union of two {_span(pair)}")
    return "; ".join(parts)


def _absent_tasks(report: Report) -> str:
    """Which absent tasks go to each other, and how often the others go to a wrong single pattern."""
    loto = report["leave_one_task_out"]
    most = {task: row["most_to"][0][0] for task, row in loto.items() if row["most_to"]}
    mutual = sorted({tuple(sorted((a, b))) for a, b in most.items() if most.get(b) == a})
    paired = {task for pair in mutual for task in pair}
    others = [row["single"] for task, row in loto.items() if task not in paired]
    text = "; ".join(f"{a} and {b} go mostly to each other" for a, b in mutual)
    if others:
        text += f"{'; ' if text else ''}the other absent tasks go to a wrong single pattern {_span(others)} of the time"
    return text


def _two_stages(report: Report) -> str:
    """What the n-gram stage decides, how often the one-stage router agrees, and what embedding all costs."""
    agreement, one = report["first_stage_agreement"], report["one_stage_route_ms"]
    first = report["results"][SERVED]["first_stage"]
    return (
        f"The n-gram stage decides {first:.0f}% of the queries without embedding them, and the one-stage router "
        f"(every query embedded) serves the same on {agreement['on_first_stage']:.1f}% of those "
        f"({agreement['all']:.1f}% of all decisions); it takes {one['p50']:.1f} ms p50, {one['p90']:.1f} ms p90"
    )


def routing_findings() -> str:
    """What each part of the router is worth on the same queries, and what a union and a decision cost."""
    report = load("routing.json")
    results = report["results"]

    def row(label: str) -> str:
        r = results[label]
        return f"{r['wrong'] + r['wrong-union']:.1f}% to a wrong pattern, {r['fallback']:.1f}% to the fallback"

    lines = [f"- Served with the defaults: {row(SERVED)}."]
    for label, what in (
        ("no unions", "Without unions, the queries of tasks the router cannot tell apart go to the full model"),
        ("no n-gram features", "Without the character n-gram features (the embedding alone)"),
        ("no out-of-store check", "Without the out-of-store check"),
        ("first round (similarity cut 0.3)", "The first round's rule (a classifier on embeddings, a similarity cut)"),
    ):
        if label in results:
            lines.append(f"- {what}: {row(label)}.")
    lines.append(f"- Left out of the store: {_absent_tasks(report)}.")
    lines.append(
        f"- A union costs memory, not accuracy. Kept by the demo stores: {_union_cost(report)}. A dense union "
        "carries no SEAP bias compensation (each pattern's bias stands for channels the union may keep)."
    )
    targets = report["targets"]
    met = targets.get("routing p50 <= 5 ms", targets.get("routing p50 <= 15 ms"))
    lines.append(
        f"- One routing decision: {route_p50(report)}"
        + ("" if met is None else f"; the p50 target is {'met' if met else 'missed'}")
        + (f". {_two_stages(report)}" if "first_stage_agreement" in report else "")
        + ". The rest of "
        + ("an embedded query's " if "first_stage_agreement" in report else "a ")
        + "decision is all-MiniLM-L6-v2's forward pass (cProfile: its linear layers); one "
        "intra-op thread per worker is how `taskmoe serve` runs on the CPU, so the one-thread figure is the "
        "served one."
    )
    return "\n".join(lines) + "\n"
