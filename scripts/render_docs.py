"""Render the docs' measurement tables from the benchmark JSON, so that pages and results never disagree.

    python scripts/render_docs.py              # rewrite the generated sections of README.md and docs/*.md
    python scripts/render_docs.py --check      # exit 1 (and say where) if any page is out of date

A generated section sits between `<!-- generated:NAME -->` and `<!-- end:NAME -->`; NAME says which renderer
fills it. Everything outside the markers is written by hand. Under each section the renderer writes which
result files it came from and the commit and date each was measured at (their "measured" key).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tables_core import core_cpu, gpu_check
from tables_coverage import coverage, coverage_summary
from tables_keep_auto import keep_auto, keep_auto_seconds
from tables_models import demo_models, supported_models, unsupported_models
from tables_pruning import (
    MOVED,
    pruning_cross,
    pruning_dense,
    pruning_findings,
    pruning_moe,
    pruning_seconds,
    pruning_settings,
    pruning_targets,
    refinement_choice,
    relative,
)
from tables_routing import SERVED, routing, routing_findings, routing_settings, routing_targets
from tables_store import fit_placement, store_changes
from tables_substitutes import LOW_RANK_ROW, pruning_low_rank, substitutes
from tables_suggest import suggestions
from tables_variants import RATIOS, fp8_slots, variants, variants_findings

from _measured import ROUTING_REWRITE, describe, predates
from _results import ROOT, load
from tables_server import SERVER_SECTIONS, server_routing_note

SECTION = re.compile(r"(<!-- generated:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end:(?P=name) -->)", re.DOTALL)
ROUTED_RESULTS = ("served.json", "server.json")  # results with routed figures, which the routing rewrite changed


@dataclass(frozen=True)
class Section:
    """A generated section: its renderer, the result files it reads, and whether their stamps go under it (the
    headline table stamps each row instead)."""

    render: Callable[[], str]
    files: tuple[str, ...] = ()
    footer: bool = True


def stamp(name: str) -> str:
    """`bench/results/NAME` measured at `<commit>` on <date>, and, for routed results taken before the routing
    rewrite, that they were."""
    text = f"`bench/results/{name}` {describe(load(name)['measured'])}"
    if name in ROUTED_RESULTS and predates(load(name)["measured"]):
        text += f", before the routing rewrite (`{ROUTING_REWRITE['commit'][:7]}`)"
    return text


def _row_stamp(name: str) -> str:
    """The stamp of result file `name`; "FILE#PART" is the stamp of the run that measured PART (a run of one
    model with `--only` records the earlier run's stamp as its `rest`)."""
    name, _, part = name.partition("#")
    measured = load(name)["measured"]
    while part and measured.get("only") not in (None, part) and isinstance(measured.get("rest"), dict):
        measured = measured["rest"]
    old = " (before the routing rewrite)" if name in ROUTED_RESULTS and predates(measured) else ""
    return f"`{measured['commit'][:10]}`, {measured['date'][:10]}{old}"


def headline() -> str:
    """The README's few numbers, each from its result file, with where the whole table is."""
    pruning, routing_report, variants_report, server = (
        load(n) for n in ("pruning.json", "routing.json", "variants.json", "server.json")
    )
    moe = pruning["models"]["demo-moe"]
    kept, worst = relative(moe["keep_0.5"]["methods"][MOVED], moe["full"])
    quarter, quarter_worst = relative(moe["keep_0.25"]["methods"][MOVED], moe["full"])
    low = load("pruning_low_rank.json")
    low_moe = low["models"]["demo-moe"]
    low_quarter, low_worst = relative(low_moe["keep_0.25"]["methods"][LOW_RANK_ROW], low_moe["full"])
    low_block = low_moe["keep_0.25"]
    low_memory = (low_block["kept_expert_bytes"] + low_block["low_rank_bytes"]) / low_block["all_expert_bytes"]
    served = routing_report["results"][SERVED]
    ratio = {t["ratio"]: t["value"] for t in variants_report["targets"]}
    single = server["single_request"]
    rows = [
        (
            f"demo-moe with half its experts ({MOVED})",
            f"{100 * kept:.1f}% of the full model's accuracy, worst task {100 * worst:.1f}%",
            "[pruning accuracy](docs/benchmarks-pruning.md)",
            "pruning.json#demo-moe",
        ),
        (
            "demo-moe with a quarter of its experts (the same recipe)",
            f"{100 * quarter:.1f}% of the full model's accuracy, worst task {100 * quarter_worst:.1f}%",
            "[pruning accuracy](docs/benchmarks-pruning.md)",
            "pruning.json#demo-moe",
        ),
        (
            f"demo-moe with a quarter of its experts, the others low-rank novices ({LOW_RANK_ROW})",
            f"{100 * low_quarter:.1f}% of the full model's accuracy, worst task {100 * low_worst:.1f}%, in "
            f"{100 * low_memory:.1f}% of the experts' memory",
            "[what stands in for a pruned expert](docs/benchmarks-pruning.md#what-stands-in-for-a-pruned-expert)",
            "pruning_low_rank.json#demo-moe",
        ),
        (
            f"routing {routing_report['settings']['queries']:,} unseen benchmark prompts",
            f"{served['own'] + served['union']:.1f}% to their own pattern or a union with it, "
            f"{served['wrong'] + served['wrong-union']:.1f}% to a wrong one; {routing_report['route_ms_p50']:.1f} ms "
            "p50 a decision",
            "[routing accuracy](docs/benchmarks-routing.md)",
            "routing.json",
        ),
        (
            "building a 50% variant from disk (warm)",
            f"{ratio[RATIOS['warm_vs_full']]:.2f}x the time of a full `from_pretrained`, "
            f"{ratio[RATIOS['resident']]:.2f}x its expected memory",
            "[variant build cost](docs/benchmarks.md#variant-build-cost)",
            "variants.json",
        ),
        (
            "three patterns in the expert pool",
            f"{ratio[RATIOS['pool_union']]:.2f}x the backbone plus the union of their experts "
            f"({ratio[RATIOS['variants_sum']]:.2f}x as separate variants)",
            "[variant build cost](docs/benchmarks.md#variant-build-cost)",
            "variants.json",
        ),
        (
            "one request through the server, pattern named",
            f"{single['ratio']:.2f}x the time of `generate` in process",
            "[server overhead and load](docs/benchmarks.md#server-overhead-and-load)",
            "server.json",
        ),
    ]
    lines = ["| | measured | table | measured at |", "|---|---|---|---|"]
    lines += [f"| {what} | {value} | {link} | {_row_stamp(name)} |" for what, value, link, name in rows]
    return "\n".join(lines) + "\n"


def flags() -> str:
    """`taskmoe serve`'s settings, from `ServerConfig` itself: the table can never disagree with the flags."""
    from server.config import settings_rows

    lines = ["| flag | environment | default | what it sets |", "|---|---|---|---|"]
    for flag, variable, default, meaning in settings_rows():
        lines.append(f"| `{flag}` | `{variable}` | {f'`{default}`' if default else ''} | {meaning} |")
    return "\n".join(lines) + "\n"


SECTIONS: dict[str, Section] = {
    "flags": Section(flags),
    "suggestions": Section(suggestions, ("suggest.json",)),
    "coverage": Section(coverage, ("coverage.json",)),
    "coverage-summary": Section(coverage_summary, ("coverage.json",)),
    "keep-auto": Section(keep_auto, ("keep_auto.json",)),
    "keep-auto-choice": Section(lambda: keep_auto(load("keep_auto_choice.json")), ("keep_auto_choice.json",)),
    "keep-auto-512": Section(lambda: keep_auto(load("keep_auto_512.json")), ("keep_auto_512.json",)),
    "keep-auto-low-rank": Section(lambda: keep_auto(load("keep_auto_low_rank.json")), ("keep_auto_low_rank.json",)),
    "keep-auto-seconds": Section(keep_auto_seconds, ("keep_auto_seconds.json",)),
    "headline": Section(
        headline,
        ("pruning.json", "pruning_low_rank.json", "routing.json", "variants.json", "server.json"),
        footer=False,
    ),
    "demo-models": Section(demo_models),
    "supported-models": Section(supported_models),
    "unsupported-models": Section(unsupported_models),
    "routing-settings": Section(routing_settings, ("routing.json",)),
    "routing": Section(routing, ("routing.json",)),
    "routing-targets": Section(routing_targets, ("routing.json",)),
    "routing-findings": Section(routing_findings, ("routing.json",)),
    **{name: Section(renderer, ("server.json",)) for name, (_, renderer) in SERVER_SECTIONS.items()},
    "server-routing-note": Section(server_routing_note, ("server.json", "routing.json")),
    "store-changes": Section(store_changes, ("store_changes.json",)),
    "fit-placement": Section(fit_placement, ("fit_placement.json",)),
    "variants": Section(variants, ("variants.json",)),
    "variants-findings": Section(variants_findings, ("variants.json",)),
    "fp8-slots": Section(fp8_slots, ("variants_fp8.json",)),
    "core-cpu": Section(core_cpu, ("core_cpu.json",)),
    "gpu-check": Section(gpu_check),  # stamps itself: gpu.json exists once the check has run on a GPU
    "pruning-settings": Section(pruning_settings, ("pruning.json",)),
    "pruning-targets": Section(pruning_targets, ("pruning.json", "served.json")),
    "pruning-moe": Section(pruning_moe, ("pruning.json",)),
    "pruning-cross": Section(pruning_cross, ("pruning.json",)),
    "pruning-seconds": Section(pruning_seconds, ("pruning.json",)),
    "pruning-dense": Section(pruning_dense, ("pruning.json",)),
    "pruning-findings": Section(pruning_findings, ("pruning.json",)),
    "refinement-choice": Section(refinement_choice, ("refinement_choice.json",)),
    "substitutes": Section(substitutes, ("substitutes.json",)),
    "pruning-low-rank": Section(pruning_low_rank, ("pruning_low_rank.json",)),
}


def body(name: str) -> str:
    """What section `name` holds: its rendering, then its files' stamps."""
    if name not in SECTIONS:
        raise KeyError(f"no renderer for generated section {name!r}; known: {', '.join(SECTIONS)}")
    section = SECTIONS[name]
    text = section.render().rstrip("\n") + "\n"
    if section.footer and section.files:
        text += "\n_" + "; ".join(stamp(f) for f in section.files) + "._\n"
    return text


def render(text: str) -> str:
    """`text` with every generated section filled from the JSON; unknown section names are an error."""
    return SECTION.sub(lambda m: f"{m.group(1)}{body(m.group('name'))}{m.group(4)}", text)


def pages(root: Path = ROOT) -> list[Path]:
    """The pages the renderer keeps: the README and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="*", type=Path, help="default: README.md and docs/*.md")
    parser.add_argument("--check", action="store_true", help="fail if a page differs from what the JSON says")
    args = parser.parse_args(argv)
    stale = []
    for page in args.pages or pages():
        text = page.read_text()
        rendered = render(text)
        if args.check:
            stale += [f"{page}: {m.group('name')}" for m in SECTION.finditer(text) if m.group(0) not in rendered]
        elif rendered != text:
            page.write_text(rendered)
            print(f"rendered {page}")
    if stale:
        print("generated sections out of date (run python scripts/render_docs.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
