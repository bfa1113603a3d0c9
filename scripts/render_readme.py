"""Render the README's measurement tables from the benchmark JSON, so the two never disagree.

    python scripts/render_readme.py            # rewrite the generated sections of README.md
    python scripts/render_readme.py --check    # exit 1 (and say where) if README.md is out of date

A generated section sits between `<!-- generated:NAME -->` and `<!-- end:NAME -->`; NAME says which
renderer fills it. Everything outside the markers is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TASKS = ("arith", "reverse", "sort", "upper", "spell", "translate")
SECTION = re.compile(r"(<!-- generated:(?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end:(?P=name) -->)", re.DOTALL)


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean(values: dict[str, float]) -> float:
    return sum(values[t] for t in TASKS) / len(TASKS)


def _relative(values: dict[str, float], full: dict[str, float]) -> tuple[float, float]:
    """(mean accuracy / the full model's mean, the lowest per-task ratio to the full model)."""
    worst = min(values[t] / full[t] if full[t] else 1.0 for t in TASKS)
    return _mean(values) / _mean(full), worst


def pruning_moe() -> str:
    report = _load("pruning.json")
    lines = []
    header = "| | " + " | ".join(TASKS) + " | mean | of full | worst task of full |"
    rule = "|---|" + "---|" * (len(TASKS) + 3)
    for name, model in report["models"].items():
        full = model["full"]
        lines += [
            f"**{name}** ({model['experts']} routed experts, top-{model['top_k']}): greedy exact match (%) on "
            f"{report['settings']['examples_per_task']} held-out examples per task",
            "",
            header,
            rule,
            "| full model | "
            + " | ".join(_pct(full[t]) for t in TASKS)
            + f" | **{_pct(_mean(full))}** | 100.0 | 100.0 |",
        ]
        for key in sorted((k for k in model if k.startswith("keep_")), key=lambda k: -float(k[5:])):
            block = model[key]
            for method, values in block["methods"].items():
                relative, worst = _relative(values, full)
                label = f"{method}, keep {block['experts_kept']}/{block['of']}"
                lines.append(
                    f"| {label} | "
                    + " | ".join(_pct(values[t]) for t in TASKS)
                    + f" | **{_pct(_mean(values))}** | {_pct(relative)} | {_pct(worst)} |"
                )
        lines.append("")
    return "\n".join(lines)


def pruning_cross() -> str:
    report = _load("pruning.json")
    lines = []
    for name, model in report["models"].items():
        for key in sorted((k for k in model if k.startswith("keep_")), key=lambda k: -float(k[5:])):
            block = model[key]
            lines += [
                f"**{name}, keep {block['experts_kept']}/{block['of']}, {block['cross_task_recipe']}**: rows are the "
                "pattern, columns the task served",
                "",
                "| pattern \\ task | " + " | ".join(TASKS) + " |",
                "|---|" + "---|" * len(TASKS),
            ]
            for pattern, values in block["cross_task"].items():
                lines.append(f"| {pattern} | " + " | ".join(_pct(values[t]) for t in TASKS) + " |")
            lines.append("")
    return "\n".join(lines)


def pruning_seconds() -> str:
    report = _load("pruning.json")
    lines = ["| model | kept | recipe | median s per pattern | slowest s |", "|---|---|---|---|---|"]
    for name, model in report["models"].items():
        for key in sorted((k for k in model if k.startswith("keep_")), key=lambda k: -float(k[5:])):
            block = model[key]
            for recipe, per_task in block["refinement_seconds"].items():
                values = list(per_task.values())
                lines.append(
                    f"| {name} | {block['experts_kept']}/{block['of']} | {recipe} | "
                    f"{statistics.median(values):.1f} | {max(values):.1f} |"
                )
    return "\n".join(lines) + "\n"


def pruning_dense() -> str:
    dense = _load("pruning.json")["dense"]
    full = dense["full"]
    lines = [
        f"**demo-dense** (MLP width {dense['width']}, {dense['width'] / dense['hidden']:.0f}x the hidden size): greedy "
        "exact match (%) per task",
        "",
        "| | " + " | ".join(TASKS) + " | mean | points lost |",
        "|---|" + "---|" * (len(TASKS) + 2),
        "| full model | " + " | ".join(_pct(full[t]) for t in TASKS) + f" | **{_pct(_mean(full))}** | 0.0 |",
    ]
    for key in sorted(k for k in dense if k.startswith("sparsity_")):
        for method, values in dense[key]["methods"].items():
            lost = 100 * (_mean(full) - _mean(values))
            lines.append(
                f"| {method}, sparsity {round(100 * float(key[9:]))}% | "
                + " | ".join(_pct(values[t]) for t in TASKS)
                + f" | **{_pct(_mean(values))}** | {lost:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _best(model: dict[str, Any], key: str) -> tuple[str, float, float]:
    """The recipe with the highest mean at a keep level: (name, mean of full, worst task of full)."""
    block = model[key]["methods"]
    name = max(block, key=lambda m: _relative(block[m], model["full"])[0])
    return (name, *_relative(block[name], model["full"]))


def pruning_targets() -> str:
    report = _load("pruning.json")
    models, dense = report["models"], report["dense"]
    rows = []

    def row(target: str, measured: str, met: bool) -> None:
        rows.append(f"| {target} | {measured} | {'met' if met else 'missed'} |")

    if "demo-moe" in models:
        name, relative, worst = _best(models["demo-moe"], "keep_0.5")
        row(
            "demo-moe, 50% kept: >= 99% of the full model's mean, >= 95% on every task",
            f"{_pct(relative)}% of the mean, worst task {_pct(worst)}% ({name})",
            relative >= 0.99 and worst >= 0.95,
        )
    quarter = {m: _best(models[m], "keep_0.25") for m in models if "keep_0.25" in models[m]}
    if quarter:
        shape = max(quarter, key=lambda m: quarter[m][1])
        row(
            "25% kept: >= 90% of the full model's mean, on either demo shape",
            "; ".join(f"{m}: {_pct(quarter[m][1])}% ({quarter[m][0]})" for m in quarter),
            quarter[shape][1] >= 0.9,
        )
    if (RESULTS / "served.json").is_file():
        served = _load("served.json")
        row(
            f"served routed by `{served['command']}`: >= 99% as often right as `@full`",
            f"{_pct(served['routed_correct'])}% vs {_pct(served['full_correct'])}% = {100 * served['ratio']:.2f}% "
            f"({served['prompts_per_task']} unseen prompts per task)",
            served["ratio"] >= 0.99,
        )
    full = _mean(dense["full"])
    seap20 = dense["sparsity_0.2"]["methods"]["seap-expert"]
    fifty = dense["sparsity_0.5"]["methods"]
    lost = 100 * (full - _mean(seap20))
    row("demo-dense, SEAP at 20% sparsity: loses <= 2 points", f"{lost:.1f} points", lost <= 2)
    margin = 100 * (_mean(fifty["seap-expert"]) - _mean(fifty["magnitude"]))
    row(
        "demo-dense, SEAP at 50%: >= 10 points above magnitude pruning",
        f"{_pct(_mean(fifty['seap-expert']))} vs {_pct(_mean(fifty['magnitude']))}: {margin:+.1f} points",
        margin >= 10,
    )
    slowest = max(
        value
        for model in models.values()
        for key in model
        if key.startswith("keep_")
        for per_task in model[key]["refinement_seconds"].values()
        for value in per_task.values()
    )
    row("calibrating one refined pattern: <= 5 minutes on this CPU", f"slowest {slowest:.0f} s", slowest <= 300)
    return "\n".join(["| target | measured | result |", "|---|---|---|", *rows]) + "\n"


RENDERERS: dict[str, Callable[[], str]] = {
    "pruning-targets": pruning_targets,
    "pruning-moe": pruning_moe,
    "pruning-cross": pruning_cross,
    "pruning-seconds": pruning_seconds,
    "pruning-dense": pruning_dense,
}


def render(text: str) -> str:
    """`text` with every generated section filled from the JSON; unknown section names are an error."""

    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise KeyError(f"no renderer for generated section {name!r}; known: {', '.join(RENDERERS)}")
        body = RENDERERS[name]().rstrip("\n") + "\n"
        return f"{match.group(1)}{body}{match.group(4)}"

    return SECTION.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="fail if the README differs from what the JSON says")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    rendered = render(text)
    if args.check:
        if rendered != text:
            stale = [m.group("name") for m in SECTION.finditer(text) if m.group(0) not in rendered]
            print(f"{args.readme}: generated sections out of date: {', '.join(stale)}; run scripts/render_readme.py")
            return 1
        return 0
    args.readme.write_text(rendered)
    print(f"rendered {len(SECTION.findall(text))} sections of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
