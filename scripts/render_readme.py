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


def variants() -> str:
    """`scripts/bench_variants.py`: building variants from disk, the copy floor, and the expert pool."""
    report = _load("variants.json")
    settings, machine = report["settings"], report["machine"]
    model = settings["model"]
    header = (
        f"Random Qwen3-MoE checkpoint: {settings['checkpoint_bytes'] / 1024**3:.2f} GiB, {model['num_hidden_layers']} "
        f"layers x {model['num_experts']} experts (top-{model['num_experts_per_tok']}), bf16; {machine['nproc']} CPUs, "
        f"torch {machine['torch']}; medians of {settings['repeats']}; cold = {settings['cold']}"
    )
    return "\n\n".join([header, report["table"], report["legend"]]) + "\n"


Report = dict[str, Any]
SERVERS = {"pool": "expert pool", "variants": "a variant per pattern"}


def _server(report: Report | None) -> Report:
    """The server benchmark's report: the one given (`scripts/bench_server.py` prints its own run), or the
    file the README is rendered from."""
    return report if report is not None else _load("server.json")


def server_overhead(report: Report | None = None) -> str:
    """`scripts/bench_server.py`: one request through the server against direct generation; routing."""
    report = _server(report)
    single, routing = report["single_request"], report["routing"]
    return (
        "\n".join(
            [
                "| measure | measured | target |",
                "|---|---|---|",
                f"| one request, pattern named, vs direct `generate` | {single['ratio']:.2f}x "
                f"({single['server_explicit_p50_ms']:.1f} ms vs {single['direct_generate_p50_ms']:.1f} ms) "
                "| <= 1.15x |",
                f"| one request, routed, vs direct `generate` | {single['ratio_routed']:.2f}x "
                f"({single['server_routed_p50_ms']:.1f} ms) | (routing has its own target) |",
                f"| routing (embed + search + rule), p50 | {routing['p50_ms']:.1f} ms | <= 15 ms |",
            ]
        )
        + "\n"
    )


def _generator_cpu(level: Report) -> str:
    seconds = f"{level['generator_cpu_s']:.1f} s, " if "generator_cpu_s" in level else ""
    return f"{seconds}{100 * level['generator_cpu_share']:.0f}% of a core"


def _levels(report: Report, scenario: str) -> list[str]:
    """One row per server, stream mode and client count of `scenario`."""
    lines = [
        "| server | clients | streamed | requests | tokens/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 "
        "| load generator CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, levels in report["load"].items():
        for x in (x for x in levels if x["scenario"] == scenario):
            ttft = [f"{x[key]:.0f} ms" if key in x else "-" for key in ("ttft_p50_ms", "ttft_p99_ms")]
            lines.append(
                f"| {SERVERS[mode]} | {x['clients']} | {'yes' if x['stream'] else 'no'} | {x['requests']} | "
                f"{x['tokens_per_second']:.0f} | {x['latency_p50_ms']:.0f} ms | {x['latency_p99_ms']:.0f} ms | "
                f"{' | '.join(ttft)} | {_generator_cpu(x)} |"
            )
    return lines


def _ratios(report: Report, key: str, label: str, target: str) -> list[str]:
    """A tokens/s ratio per server and stream mode, with the target it is held to (on the pool)."""
    lines = ["| ratio of tokens/s | expert pool | a variant per pattern | target (expert pool) |", "|---|---|---|---|"]
    for stream in ("whole", "streamed"):
        pool, variants = (report["ratios"][f"{mode}_{stream}"][key] for mode in SERVERS)
        goal = report["targets"].get(target + ("" if stream == "whole" else "_streamed"))
        verdict = f">= {goal['target']:g}x: {'met' if goal['pass'] else 'missed'}" if goal else "-"
        lines.append(f"| {label} ({stream}) | {pool:.2f}x | {variants:.2f}x | {verdict} |")
    return lines


def server_load(report: Report | None = None) -> str:
    """One pattern over HTTP at 1 and 32 clients, with and without the expert pool: how batching scales."""
    report = _server(report)
    shares = [x["generator_cpu_share"] for levels in report["load"].values() for x in levels]
    lines = _levels(report, "one pattern")
    lines += ["", *_ratios(report, "one_pattern_32_over_1", "32 clients / 1 client", "one_pattern_32_vs_1_client")]
    lines += ["", f"The load generator used at most {100 * max(shares):.0f}% of a core in any level of this run."]
    return "\n".join(lines) + "\n"


def server_mixed(report: Report | None = None) -> str:
    """Three patterns mixed at 8 and 32 clients, and against one pattern at 32: do patterns share a batch?"""
    report = _server(report)
    lines = _levels(report, "three patterns")
    key, label = "three_patterns_32_over_one_pattern_32", "three patterns / one pattern, 32 clients"
    return "\n".join([*lines, "", *_ratios(report, key, label, "three_patterns_vs_one_at_32_clients")]) + "\n"


def server_cycling(report: Report | None = None) -> str:
    """Every pattern in turn under a budget for the union of their experts: what the later rounds cost."""
    report = _server(report)
    lines = [
        "| server | budget (union of the experts) | patterns x rounds | evictions in round 1 "
        "| evictions after round 1 | loads after round 1 |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["cycling"]:
        union = f" ({c['union_bytes'] / 2**20:.1f} MiB)" if "union_bytes" in c else ""
        cells = [f"{c[key]:.0f} {c['unit']}" if key in c else "-" for key in ("evictions_first_round",)]
        cells.append(f"{c['evictions_after_first_round']:.0f} {c['unit']}")
        cells.append(f"{c['loads_after_first_round']:.0f} {c['unit']}" if "loads_after_first_round" in c else "-")
        lines.append(
            f"| {SERVERS['pool' if c['expert_pool'] else 'variants']} | {c['budget_bytes'] / 2**20:.1f} MiB{union} | "
            f"{c['patterns']} x {c['rounds']} | {' | '.join(cells)} |"
        )
    return "\n".join(lines) + "\n"


def server_prefill(report: Report | None = None) -> str:
    report = _server(report)
    lines = [
        "| 16 streams, and | inter-token gap p50 | p99 | max | the long prompt's first token |",
        "|---|---|---|---|---|",
    ]
    for p in report["prefill"]:
        if not p["long_prompt"]:
            label, ttft = "no long prompt", "-"
        else:
            chunk = p["max_prefill_tokens"]
            label = f"a {p['long_prompt_characters']}-token prompt, " + (
                f"prefilled {chunk} tokens at a time" if chunk else "prefilled whole"
            )
            ttft = f"{p['long_prompt_ttft_ms']:.0f} ms"
        lines.append(
            f"| {label} | {p['gap_p50_ms']:.0f} ms | {p['gap_p99_ms']:.0f} ms | {p['gap_max_ms']:.0f} ms | {ttft} |"
        )
    return "\n".join(lines) + "\n"


def server_decoder(report: Report | None = None) -> str:
    report = _server(report)
    lines = ["| decoding in process, no HTTP | concurrent generations | tokens/s |", "|---|---|---|"]
    for row in report["decoder"]:
        lines.append(f"| {row['mode']} | {row['clients']} | {row['tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


TARGET_LABELS: dict[str, tuple[str, str]] = {
    # key: (what is held to the target, how the numbers read)
    "server_vs_direct_generate": ("one request, pattern named, vs direct `generate`: at most", "{:.2f}x"),
    "routing_p50_ms": ("routing p50: at most", "{:.1f} ms"),
    "one_pattern_32_vs_1_client": ("expert pool, one pattern, 32 / 1 client (whole): at least", "{:.2f}x"),
    "one_pattern_32_vs_1_client_streamed": ("expert pool, one pattern, 32 / 1 client (streamed): at least", "{:.2f}x"),
    "three_patterns_vs_one_at_32_clients": (
        "expert pool, three patterns / one pattern at 32 clients (whole): at least",
        "{:.2f}x",
    ),
    "three_patterns_vs_one_at_32_clients_streamed": (
        "expert pool, three patterns / one pattern at 32 clients (streamed): at least",
        "{:.2f}x",
    ),
    "load_generator_cpu_share_of_a_core": ("the load generator's CPU in any level, of a core: at most", "{:.0%}"),
    "evictions_after_first_round_with_the_pool": ("expert pool, evictions after the first round: at most", "{:.0f}"),
}


def server_targets(report: Report | None = None) -> str:
    """Every target of the server benchmark, met or missed, in this run."""
    report = _server(report)
    lines = ["| target | threshold | measured | result |", "|---|---|---|---|"]
    for key, goal in report["targets"].items():
        label, number = TARGET_LABELS.get(key, (key, "{:.2f}"))
        lines.append(
            f"| {label} | {number.format(goal['target'])} | {number.format(goal['measured'])} | "
            f"{'met' if goal['pass'] else 'missed'} |"
        )
    return "\n".join(lines) + "\n"


SERVER_SECTIONS: dict[str, tuple[tuple[str, ...], Callable[[Report | None], str]]] = {
    # section: (the report keys it needs, its renderer)
    "server-overhead": (("single_request", "routing"), server_overhead),
    "server-load": (("load",), server_load),
    "server-mixed": (("load",), server_mixed),
    "server-cycling": (("cycling",), server_cycling),
    "server-prefill": (("prefill",), server_prefill),
    "server-decoder": (("decoder",), server_decoder),
    "server-targets": (("targets",), server_targets),
}


def server_tables(report: Report) -> str:
    """The server sections that `report` has data for (a run of some phases has some), one after another."""
    return "\n".join(
        renderer(report) for needs, renderer in SERVER_SECTIONS.values() if all(key in report for key in needs)
    )


def routing() -> str:
    """`scripts/eval_routing.py`: where unseen benchmark prompts go, per router, and the targets."""
    report = _load("routing.json")
    columns = ("own", "union", "wrong", "wrong-union", "fallback")
    lines = [
        "| router | own pattern | union with own | wrong pattern | union without own | fallback |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in report["results"].items():
        cells = " | ".join(f"{row[k]:.1f}" for k in columns)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def routing_targets() -> str:
    """`scripts/eval_routing.py`: the targets, met or missed, with the served router's figures."""
    report = _load("routing.json")
    served = report["results"]["served (defaults)"]
    threads = report.get("route_ms_p50_by_threads", {})
    measured = {
        "wrong routes <= 2%": f"{served['wrong'] + served['wrong-union']:.1f}%",
        "own or union >= 93%": f"{served['own'] + served['union']:.1f}%",
        "full fallback <= 5%": f"{served['fallback']:.1f}%",
        "leave-one-task-out wrong single <= 35%": f"{report['leave_one_task_out_wrong_single_mean']:.1f}%",
        "routing p50 <= 15 ms": f"{report['route_ms_p50']:.1f} ms (1 thread, as served)"
        + "".join(f"; {v:.1f} ms with {n} threads" for n, v in threads.items() if str(n) != "1")
        + (f"; {report['decide_ms_p50']:.1f} ms of it outside the embedder" if "decide_ms_p50" in report else ""),
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


RENDERERS: dict[str, Callable[[], str]] = {
    "routing": routing,
    "routing-targets": routing_targets,
    **{name: renderer for name, (_, renderer) in SERVER_SECTIONS.items()},
    "variants": variants,
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
