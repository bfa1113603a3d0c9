"""Tables of `scripts/bench_core.py` (`bench/results/core_cpu.json`) and of `scripts/gpu_check.py`
(`bench/results/gpu.json`), for the docs and for the scripts' own output."""

from __future__ import annotations

from _measured import describe
from _results import RESULTS, Report, load

MIB = 1024**2
TARGETS = {
    "mixed_over_one": "three patterns mixed / one pattern, tokens/s",
    "pool_over_variant": "one pattern through the pool / its own variant, tokens/s",
    "step_over_read": "decode step / time to read its bytes at the measured bandwidth",
}
GPU_FILE = "gpu.json"
READ_NOTE = (
    "Experts read: the distinct experts the step's rows chose, summed over the sparse layers (each one's weights "
    "are read once a step). One pattern keeps half of each layer's experts and the three patterns 3/4 of them "
    "between them, so a mixed batch chooses among more experts and reads more weights; the last column shows "
    "whether the expert time follows the weights read."
)
NOT_RUN = (
    "The GPU check has not run on a GPU yet. On a machine with a CUDA device, run `make gpu-check` (or "
    "`make gpu-check PYTHON=python3` where there is no virtual environment); it writes `bench/results/gpu.json`, "
    "and `python scripts/render_docs.py` puts its tables here."
)


def _settings_line(report: Report) -> str:
    s, m = report["settings"], report["machine"]
    shape = s["shape"]
    device = m.get("gpu", f"{m['cpus']} CPUs") if s["device"] == "cuda" else f"{m['cpus']} CPUs"
    return (
        f"Random Qwen3-MoE checkpoint{' (quick: tiny shapes)' if s['quick'] else ''}: {s['layers']} layers x "
        f"{shape['num_experts']} experts of {shape['hidden_size']} x {shape['moe_intermediate_size']} (top-"
        f"{shape['num_experts_per_tok']}), {shape['num_attention_heads']} / {shape['num_key_value_heads']} heads of "
        f"{shape['head_dim']}, vocabulary {shape['vocab_size']:,}; {device}, torch {m['torch']}, transformers "
        f"{m['transformers']}; {s['dtype']}; patterns of {s['kept_per_layer']} experts per layer in a pool of "
        f"{s['slots']} slots; medians of {s['steps']} decode steps after a {s['prompt']}-token prompt per row."
    )


def _steps(report: Report) -> list[str]:
    split = any("split_ms" in row for row in report["steps"])
    head = "| batch | what runs | step ms | tokens/s |"
    head += " routing ms | experts ms | rest ms | experts read | experts ms per expert read |" if split else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if split:
        lines = [READ_NOTE, "", *lines]
    for row in report["steps"]:
        line = f"| {row['batch']} | {row['mode']} | {row['step_ms']:.1f} | {row['tokens_per_s']:,.0f} |"
        if split:
            parts = row.get("split_ms")
            line += (
                " | | | | |" if parts is None else "".join(f" {parts[k]:.1f} |" for k in ("routing", "experts", "rest"))
            )
            read = row.get("experts_read")
            if parts is not None:
                line += " |  |" if not read else f" {read:.0f} | {parts['experts'] / read:.3f} |"
        lines.append(line)
    return lines


ONE = "one pattern"
RATIO_COLUMNS = {
    "mixed_over_one": "three mixed / one pattern",
    "pool_over_variant": "pool / variant",
    "static_mixed_over_one": "three mixed / one pattern, static step",
    "static_over_dynamic": "one pattern, static step / dynamic cache",
}


def _ratios(report: Report) -> list[str]:
    columns = [key for key in RATIO_COLUMNS if any(key in entry for entry in report["ratios"])]
    lines = ["| batch | " + " | ".join(RATIO_COLUMNS[key] for key in columns) + " |", "|---|" + "---|" * len(columns)]
    for entry in report["ratios"]:
        cells = [f"{entry[key]:.2f}" if key in entry else "" for key in columns]
        lines.append(f"| {entry['batch']} | " + " | ".join(cells) + " |")
    return lines


def _switches(report: Report) -> list[str]:
    floor = "pinned host -> device copy" if report["settings"]["device"] == "cuda" else "host memory copy"
    lines = [
        f"| lease | experts copied in | MiB | seconds | copy floor ({floor}), s | x floor |",
        "|---|---|---|---|---|---|",
    ]
    for switch in report["switches"]:
        if not switch["bytes"]:
            lines.append(f"| {switch['pattern']} | 0 | 0 | {switch['seconds']:.3f} | | |")
            continue
        lines.append(
            f"| {switch['pattern']} | {switch['experts_loaded']:,} | {switch['bytes'] / MIB:,.0f} | "
            f"{switch['seconds']:.3f} | {switch['floor_seconds']:.3f} | {switch['over_floor']:.2f} |"
        )
    return lines


def _decode_read(report: Report) -> str:
    d, bandwidth = report["decode_read"], report["bandwidth"]
    return (
        f"Decode step at batch {d['batch']} ({d.get('mode', ONE)}): {d['step_ms']:.2f} ms; the bytes it must read "
        "(attention, "
        f"norms, routers, {report['settings']['shape']['num_experts_per_tok']} experts per layer, an embedding row, "
        f"the LM head): {d['bytes'] / MIB:,.0f} MiB, {d['read_ms']:.3f} ms at the measured "
        f"{bandwidth['bytes_per_s'] / 1e9:,.0f} GB/s (sum {bandwidth['sum_bytes_per_s'] / 1e9:,.0f}, copy "
        f"{bandwidth['copy_bytes_per_s'] / 1e9:,.0f}): **{d['over_floor']:.1f}x** the read time."
    )


def _targets(report: Report) -> list[str]:
    lines = []
    for t in report["targets"]:
        sign = ">=" if t["at_least"] else "<="
        lines.append(
            f"- {TARGETS.get(t['name'], t['name'])}, batch {t['batch']}: **{t['value']:.2f}** "
            f"(target {sign} {t['limit']:g}): {'met' if t['met'] else 'missed'}"
        )
    return lines


def core_table(report: Report) -> str:
    """The whole report of one `bench_core.py` run: settings, steps, ratios, switches, the read floor, targets."""
    lines = [_settings_line(report), "", *_steps(report), "", *_ratios(report), "", *_switches(report)]
    lines += ["", _decode_read(report), "", *_targets(report)]
    return "\n".join(lines) + "\n"


def core_cpu(report: Report | None = None) -> str:
    """`bench_core.py` on this CPU."""
    return core_table(report if report is not None else load("core_cpu.json"))


def gpu_check(report: Report | None = None) -> str:
    """The last `make gpu-check`: the GPU tests' outcome and the benchmark on the GPU, with its stamp; or how to
    run it, while no GPU has."""
    if report is None:
        if not (RESULTS / GPU_FILE).is_file():
            return NOT_RUN + "\n"
        report = load(GPU_FILE)
    tests = report.get("tests")
    outcome = "not run" if tests is None else f"`{tests['summary']}` (exit status {tests['returncode']})"
    lines = [f"Tests marked `gpu`: {outcome}.", "", core_table(report).rstrip("\n")]
    lines += ["", f"_`bench/results/{GPU_FILE}` {describe(report['measured'])}._"]
    return "\n".join(lines) + "\n"
