"""Tables of `scripts/bench_server.py` (`bench/results/server.json`) for the docs, and for the benchmark's own
printout of a run (every function takes the report; None reads the file)."""

from __future__ import annotations

from collections.abc import Callable

from tables_routing import route_p50

from _measured import ROUTING_REWRITE, predates
from _results import Report, load

SERVERS = {"pool": "expert pool", "variants": "a variant per pattern"}


def _server(report: Report | None) -> Report:
    return report if report is not None else load("server.json")


def _old_router(report: Report) -> str:
    """A label's suffix for routed figures measured before the routing rewrite: they timed the router of then."""
    stamp = report.get("measured")
    return f" (the router before `{ROUTING_REWRITE['commit'][:7]}`)" if stamp and predates(stamp) else ""


def server_overhead(report: Report | None = None) -> str:
    """One request through the server against direct generation; routing."""
    report = _server(report)
    single, routing, s = report["single_request"], report["routing"], report["settings"]
    old = _old_router(report)
    return (
        "\n".join(
            [
                f"{s['prompts']} prompts of the six demo tasks, {s['repeats']} repeats, greedy, at most "
                f"{s['max_tokens']} tokens, {s['torch_threads']} torch thread on both sides, {s['cpus']} CPUs; "
                "medians:",
                "",
                "| measure | measured | target |",
                "|---|---|---|",
                f"| one request, pattern named, vs direct `generate` | {single['ratio']:.2f}x "
                f"({single['server_explicit_p50_ms']:.1f} ms vs {single['direct_generate_p50_ms']:.1f} ms) "
                "| <= 1.15x |",
                f"| one request, routed{old}, vs direct `generate` | {single['ratio_routed']:.2f}x "
                f"({single['server_routed_p50_ms']:.1f} ms) | (routing has its own target) |",
                f"| routing{old}, p50 | {routing['p50_ms']:.1f} ms | <= 15 ms |",
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


def _ratios(report: Report, key: str, label: str, target: str, header: bool = True) -> list[str]:
    """A tokens/s ratio per server and stream mode, with the target it is held to (on the pool)."""
    lines = ["| ratio of tokens/s | expert pool | a variant per pattern | target (expert pool) |", "|---|---|---|---|"]
    lines = lines if header else []
    for stream in ("whole", "streamed"):
        pool, variants = (report["ratios"][f"{mode}_{stream}"].get(key) for mode in SERVERS)
        if pool is None:
            continue
        variants = f"{variants:.2f}x" if variants is not None else "-"
        goal = report["targets"].get(target + ("" if stream == "whole" else "_streamed"))
        verdict = f">= {goal['target']:g}x: {'met' if goal['pass'] else 'missed'}" if goal else "-"
        lines.append(f"| {label} ({stream}) | {pool:.2f}x | {variants} | {verdict} |")
    return lines


def _load_settings(report: Report) -> str:
    s = report["settings"]
    return (
        f"Requests ask for {s['load_max_tokens']} tokens with `ignore_eos`, greedy, {s['requests_per_client']} per "
        f"client and at least {s['least_requests']} per level, after {s['warmup_requests']} warm-up requests; "
        f"`--cache-budget {s['budget']}`."
    )


def server_load(report: Report | None = None) -> str:
    """One pattern over HTTP at 1 and 32 clients, with and without the expert pool: how batching scales."""
    report = _server(report)
    shares = [x["generator_cpu_share"] for levels in report["load"].values() for x in levels]
    lines = [_load_settings(report), "", *_levels(report, "one pattern")]
    lines += ["", *_ratios(report, "one_pattern_32_over_1", "32 clients / 1 client", "one_pattern_32_vs_1_client")]
    lines += ["", f"The load generator used at most {100 * max(shares):.0f}% of a core in any level of this run."]
    return "\n".join(lines) + "\n"


def server_mixed(report: Report | None = None) -> str:
    """Three and eight patterns mixed, against one pattern at 32 clients: do patterns share a batch? And one
    pattern through the pool against its own variant."""
    report = _server(report)
    lines = _levels(report, "three patterns")
    if any(x["scenario"] == "eight patterns" for levels in report["load"].values() for x in levels):
        lines += _levels(report, "eight patterns")[2:]
    lines += ["", *_ratios(report, *MIXED_RATIOS[0])]
    for ratio in MIXED_RATIOS[1:]:
        lines += _ratios(report, *ratio, header=False)
    return "\n".join(lines) + "\n"


MIXED_RATIOS = (
    (
        "three_patterns_32_over_one_pattern_32",
        "three patterns / one pattern, 32 clients",
        "three_patterns_vs_one_at_32_clients",
    ),
    (
        "eight_patterns_32_over_one_pattern_32",
        "eight patterns / one pattern, 32 clients",
        "eight_patterns_vs_one_at_32_clients",
    ),
    (
        "one_pattern_32_pool_over_variant",
        "one pattern, the pool / its own variant, 32 clients",
        "one_pattern_pool_vs_variant_at_32_clients",
    ),
)


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
    """Streams' inter-token gaps while a long prompt is prefilled whole or in chunks."""
    report = _server(report)
    streams = report["prefill"][0].get("streams", 16)  # runs before the key existed had 16
    lines = [
        f"| {streams} streams, and | inter-token gap p50 | p99 | max | the long prompt's first token |",
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
    """Batched decoding in the benchmark's process, without HTTP."""
    report = _server(report)
    lines = ["| decoding in process, no HTTP | concurrent generations | tokens/s |", "|---|---|---|"]
    for row in report["decoder"]:
        lines.append(f"| {row['mode']} | {row['clients']} | {row['tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


TARGET_LABELS: dict[str, tuple[str, str]] = {
    # key: (what is held to the target, how the numbers read)
    "server_vs_direct_generate": ("one request, pattern named, vs direct `generate`: at most", "{:.2f}x"),
    "routing_p50_ms": ("routing p50{old}: at most", "{:.1f} ms"),
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
    "eight_patterns_vs_one_at_32_clients": (
        "expert pool, eight patterns / one pattern at 32 clients (whole): at least",
        "{:.2f}x",
    ),
    "eight_patterns_vs_one_at_32_clients_streamed": (
        "expert pool, eight patterns / one pattern at 32 clients (streamed): at least",
        "{:.2f}x",
    ),
    "one_pattern_pool_vs_variant_at_32_clients": (
        "one pattern at 32 clients, the pool / its own variant (whole): at least",
        "{:.2f}x",
    ),
    "one_pattern_pool_vs_variant_at_32_clients_streamed": (
        "one pattern at 32 clients, the pool / its own variant (streamed): at least",
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
            f"| {label.format(old=_old_router(report))} | {number.format(goal['target'])} | "
            f"{number.format(goal['measured'])} | {'met' if goal['pass'] else 'missed'} |"
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


def server_routing_note() -> str:
    """Which router the server tables' routed figures timed, and the current router's figure beside them."""
    report, routing = load("server.json"), load("routing.json")
    current = f"The current router, timed by `scripts/eval_routing.py`: {route_p50(routing)}."
    if not _old_router(report):
        return f"The routed figures above timed the current router. {current}\n"
    return (
        f"These server figures were measured before the routing rewrite (`{ROUTING_REWRITE['commit'][:7]}`: "
        "calibrated probabilities on embedding and character n-gram features, unions, the out-of-store check); "
        f"their routed rows timed the router of that time. {current} Rerun `scripts/bench_server.py` to measure "
        "the server with it.\n"
    )
