"""Tables and findings of `scripts/bench_variants.py` (`bench/results/variants.json`) for the docs."""

from __future__ import annotations

from _results import Report, load


def variants() -> str:
    """Building variants from disk, the copy floor, and the expert pool (the tables the benchmark wrote)."""
    report = load("variants.json")
    settings, machine = report["settings"], report["machine"]
    model = settings["model"]
    header = (
        f"Random Qwen3-MoE checkpoint: {settings['checkpoint_bytes'] / 1024**3:.2f} GiB, {model['num_hidden_layers']} "
        f"layers x {model['num_experts']} experts (top-{model['num_experts_per_tok']}), bf16; {machine['nproc']} CPUs, "
        f"torch {machine['torch']}; medians of {settings['repeats']}; cold = {settings['cold']}"
    )
    return "\n\n".join([header, report["table"], report["legend"]]) + "\n"


def _ratio(report: Report, name: str) -> Report:
    return next(t for t in report["targets"] if t["ratio"] == name)


def _held(target: Report) -> str:
    """ " (over its 0.6x target)" for a missed ratio; nothing for one met or reported for information (the
    table above lists every target)."""
    return f" (over its {target['limit']:g}x target)" if target["result"] == "MISS" else ""


RATIOS = {
    # short name: the ratio's name in variants.json
    "warm_vs_full": "50% build / full load (warm)",
    "warm_vs_floor": "50% build / copy floor (warm)",
    "resident": "50% resident: RssAnon added / expected",
    "cold_vs_full": "50% build / full load (cold)",
    "cold_vs_floor": "50% build / copy floor (cold)",
    "pool_union": "pool: RssAnon of 3 patterns / (backbone + union of their experts)",
    "variants_sum": "variants: (backbone + sum of 3 variants' experts) / (backbone + union)",
    "switch_bytes": "pool: switch bytes read / bytes of B's experts A lacks",
    "switch_floor": "pool: switch A -> B / copy floor of what A lacks",
    "back_bytes": "pool: back to A, bytes read / A's bytes",
    "first_floor": "pool: first pattern into an empty pool / its copy floor",
}


def variants_findings() -> str:
    """What the build and pool tables show, each figure taken from them."""
    report = load("variants.json")
    x = {short: f"{_ratio(report, name)['value']:.2f}x{_held(_ratio(report, name))}" for short, name in RATIOS.items()}
    lines = [
        f"- A 50% variant builds in {x['warm_vs_full']} of a full `from_pretrained`'s time from a warm page cache, "
        f"at {x['warm_vs_floor']} of the copy floor, and adds {x['resident']} of its backbone and kept experts to "
        f"resident memory. Cold, it took {x['cold_vs_full']} of the full load and {x['cold_vs_floor']} of the cold "
        "copy floor; cold reads on a shared disk vary from run to run.",
        "- **The expert pool**: three patterns of half the experts, overlapping as tasks do, cost "
        f"{x['pool_union']} of the backbone plus the *union* of their experts in resident memory; as separate "
        f"variants they would cost {x['variants_sum']} of it. Switching from A to B reads {x['switch_bytes']} the "
        f"bytes of B's experts that A lacks, at {x['switch_floor']} of their copy floor; going back to A reads "
        f"{x['back_bytes']} of A's bytes. The first pattern into an empty pool took {x['first_floor']} of its copy "
        "floor.",
    ]
    return "\n".join(lines) + "\n"


def fp8_slots() -> str:
    """FP8 expert slots against bf16 slots (`bench_variants.py --fp8`): the table, then each target."""
    report = load("variants_fp8.json")
    lines = [report["header"], "", report["table"], ""]
    for target in report["targets"]:
        verdict = "met" if target["met"] else "missed"
        lines.append(f"- {target['target']}: **{target['value']:.2f}** (target <= {target['limit']:g}): {verdict}")
    return "\n".join(lines) + "\n"
