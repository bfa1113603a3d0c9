"""Tables of `scripts/eval_coverage.py` (`bench/results/coverage.json`): does coverage tell right answers
from wrong ones, and does the meter flag a pattern serving another task's traffic."""

from __future__ import annotations

from _results import Report, load

SIGNAL_NAMES = {
    "mass": "coverage over every token and layer (what the server's meter reports)",
    "mass_generated": "coverage over the generated tokens",
    "min_token_generated": "the worst generated token's coverage",
    "top1_generated": "top-1 kept, generated tokens",
    "min_layer_generated": "the worst layer's coverage, generated tokens",
    "mass_last_layer": "coverage at the last sparse layer",
    "min_layer": "the worst layer's coverage",
    "top1": "top-1 kept, every token and layer",
    "confidence": "not coverage: the served model's mean probability of the tokens it generated",
}


def _auc(report: Report) -> list[str]:
    choose, shown = report["choose"], report["report"]
    lines = [
        f"| signal, per request | ROC AUC, choice split (seed {choose['seed']}) | ROC AUC, report split "
        f"(seed {shown['seed']}) | mean, own task | mean, other tasks |",
        "|---|---|---|---|---|",
    ]
    for signal, name in SIGNAL_NAMES.items():
        means = shown["mean_signal"][signal]
        marker = " (chosen)" if signal == report["signal_chosen"] else ""
        lines.append(
            f"| {name}{marker} | {choose['auc'][signal]:.3f} | **{shown['auc'][signal]:.3f}** | "
            f"{means['own_task']:.3f} | {means['other_tasks']:.3f} |"
        )
    return lines


def _bands(signal: str, bands: list[dict]) -> list[str]:
    lines = [f"| {SIGNAL_NAMES[signal]} | requests | right |", "|---|---|---|"]
    for band in bands:
        right = "" if band["accuracy"] is None else f"{100 * band['accuracy']:.0f}%"
        lines.append(f"| {band['low']:g} to {band['high']:g} | {band['requests']} | {right} |")
    return lines


def _flags(report: Report) -> list[str]:
    lines = [
        "| tolerance | split | other task's traffic flagged within 200 requests | own task flagged within 2,000 |",
        "|---|---|---|---|",
    ]
    rows = [(entry, "choice") for entry in report["choose"]["tolerances"] if entry["tolerance"] in (0.01, 0.05, 0.1)]
    rows += [(report["report"]["flags_at_shipped"], "report (shipped default)")]
    for entry, split in rows:
        own = ", ".join(entry["own_flagged_within_2000"]) or "none"
        lines.append(
            f"| {entry['tolerance']:.2f} | {split} | {entry['other_flagged_within_200']} of "
            f"{entry['other_pairs']} | {own} |"
        )
    return lines


def coverage(report: Report | None = None) -> str:
    report = report if report is not None else load("coverage.json")
    right = report["report"]["right"] / report["report"]["requests"]
    intro = (
        f"{report['model']}: every task's {report['n']} prompts of a split served by every task's pattern through "
        f"the expert pool, greedy ({report['report']['requests']:,} requests a split, {100 * right:.0f}% of them "
        f"right in the report split); every forward pass sampled. The meter samples {report['rate']:.0%} of the "
        "passes when the flag is replayed."
    )
    shown = report["report"]
    lines = [intro, "", *_auc(report), "", *_bands("mass_generated", shown["coverage_bands"]), ""]
    if report["signal_chosen"] != "mass_generated":
        lines += [*_bands(report["signal_chosen"], shown["bands"]), ""]
    lines += _flags(report)
    return "\n".join(lines) + "\n"


def coverage_summary(report: Report | None = None) -> str:
    """The operator's page in a few sentences (`docs/watching-patterns.md`), from the same JSON."""
    report = report if report is not None else load("coverage.json")
    shown = report["report"]
    auc, covered, confident = shown["auc"], shown["coverage_bands"], shown["bands"]
    flags = shown["flags_at_shipped"]
    return (
        f"Coverage of the generated tokens tells right answers from wrong ones across the cross-task matrix with "
        f"a ROC AUC of {auc['mass_generated']:.2f} (over every token, prompt included: {auc['mass']:.2f}): "
        f"{100 * covered[0]['accuracy']:.0f}% of the answers are right below {covered[0]['high']:g}, "
        f"{100 * covered[-1]['accuracy']:.0f}% from {covered[-1]['low']:g}. The served model's own confidence, "
        f"the mean probability it gave the tokens it generated, tells them apart better, with "
        f"{auc['confidence']:.2f}: {100 * confident[0]['accuracy']:.0f}% right below {confident[0]['high']:g}, "
        f"{100 * confident[-1]['accuracy']:.0f}% from {confident[-1]['low']:g}. Replayed at the default rate "
        f"({report['rate']:.2f}) and tolerance ({report['shipped_tolerance']:.2f}), against each pattern's "
        f"answers' coverage, the flag caught a pattern serving another task's traffic within 200 requests in "
        f"{flags['other_flagged_within_200']} of the {flags['other_pairs']} cross-task streams, and flagged "
        f"{len(flags['own_flagged_within_2000']) or 'no'} pattern serving its own task in 2,000 requests.\n"
    )
