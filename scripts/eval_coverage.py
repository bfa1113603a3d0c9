"""Does a pattern's coverage predict whether it answers right? The cross-task matrix of the demo, measured.

    python scripts/eval_coverage.py [--model models/demo-moe] [-n 40] [--out bench/results/coverage.json]

Every task's prompts are served by every task's stored pattern through the expert pool (greedy, as the
server decodes them), with every forward pass sampled: the full routers run beside the masked ones, as the
server's coverage meter runs them (`server.model.coverage_meter`). Per request this gives the coverage of
each of its tokens at each sparse layer, and whether its answer is right. The script reports how well
several per-request signals separate right from wrong answers (ROC AUC over the whole matrix):

- `mass`: the share of the full router's top-k gate mass on kept experts, over every token and layer (what
  the meter reports);
- `mass_generated`: the same over the generated tokens only;
- `mass_last_layer`: over every token, the last sparse layer only;
- `min_layer`: the lowest of the per-layer means;
- `top1`: how often the full router's heaviest expert is kept;
- `min_token_generated`: the worst generated token (its layers' mean); `top1_generated`, `min_layer_generated`:
  `top1` and `min_layer` over the generated tokens;
- `confidence`: not coverage, the served model's own confidence: the mean probability it gave the tokens it
  generated (what the meter keeps for the requests it watches).

Then, per pattern, accuracy by coverage band (where accuracy drops), and the meter's flag replayed on the
recorded passes at the default sampling rate, against each pattern's calibrated reference (its answers'
coverage, `reference_coverage`): requests until a pattern serving another task's traffic is flagged, and
whether a pattern serving its own task is flagged within 2,000 requests. Signals and the
tolerance are chosen on one prompt split (`--choose-seed`) and reported on another (`--report-seed`); the
patterns were calibrated on neither.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SIGNALS = (
    "mass",
    "mass_generated",
    "min_token_generated",
    "top1_generated",
    "min_layer_generated",
    "mass_last_layer",
    "min_layer",
    "top1",
    "confidence",
)
COVERAGE_SIGNAL = "mass_generated"
"""The coverage signal the meter flags on (the recent mean over generated tokens)."""
CHOOSE_SEED, REPORT_SEED = 4101, 4202  # prompt splits: neither is a calibration seed (7000) nor EVAL_SEED
MAX_NEW_TOKENS = 24


@dataclass
class Served:
    """One request served by one pattern: whether it was right, its signals, and its passes' coverage (one
    value per forward pass: the mean over the request's real tokens of that pass and every layer)."""

    pattern: str
    task: str
    right: bool
    signals: dict[str, float]
    passes: list[float] = field(default_factory=list)


class Recorder:
    """Stands in for the pool's coverage meter: samples every pass and keeps what each layer recorded."""

    def __init__(self) -> None:
        self.passes: list[dict[int, Any]] = []

    def draw(self) -> bool:
        return True

    def finish(self, sample: Any) -> None:
        for recorded in sample.passes:
            self.passes.append({layer: (mass.cpu(), top1.cpu()) for layer, (mass, top1) in recorded.items()})


def serve(pooled: Any, tokenizer: Any, route: Any, examples: Sequence[Any], pattern: str) -> list[Served]:
    """Greedy answers of `examples` through `route`, one left-padded batch, with every pass's coverage."""
    import torch

    from demo.evaluate import chat_prompt_ids
    from demo.tasks import get_task

    recorder = Recorder()
    pooled.coverage = recorder
    prompts = [chat_prompt_ids(tokenizer, example.prompt) for example in examples]
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :], mask[row, width - len(ids) :] = torch.tensor(ids), 1
    with torch.inference_mode(), pooled.rows([route] * len(prompts)):
        generated_output = pooled.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    pooled.coverage = None
    output = generated_output.sequences
    probabilities = torch.stack(  # [rows, steps]: the probability the model gave each token it generated
        [
            torch.softmax(scores.float(), dim=-1).gather(1, output[:, width + step, None]).squeeze(1)
            for step, scores in enumerate(generated_output.scores)
        ],
        dim=1,
    )
    layers = sorted(recorder.passes[0])
    served = []
    for row, example in enumerate(examples):
        generated = output[row, width:].tolist()
        length = generated.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in generated else len(generated)
        answer = tokenizer.decode(generated[: max(length - 1, 0)] if length else [], skip_special_tokens=True)
        per_layer_mass: dict[int, list[float]] = {layer: [] for layer in layers}
        per_layer_top1: dict[int, list[float]] = {layer: [] for layer in layers}
        generated_tokens, generated_top1, passes = [], [], []  # per generated token: its layers' mean
        generated_layers: dict[int, list[float]] = {layer: [] for layer in layers}
        for step, recorded in enumerate(recorder.passes):
            seq = width if step == 0 else 1
            valid = mask[row].tolist() if step == 0 else [1 if step < length else 0]
            chosen = [i for i, v in enumerate(valid) if v]
            if not chosen:
                continue
            values, token_mass, token_top1 = [], [], []
            for layer in layers:
                mass, top1 = (t.reshape(len(examples), seq)[row] for t in recorded[layer])
                per_layer_mass[layer] += [float(mass[i]) for i in chosen]
                per_layer_top1[layer] += [float(top1[i]) for i in chosen]
                values += [float(mass[i]) for i in chosen]
                if step > 0:
                    token_mass.append(float(mass[0]))
                    token_top1.append(float(top1[0]))
                    generated_layers[layer].append(float(mass[0]))
            if step > 0:
                generated_tokens.append(statistics.fmean(token_mass))
                generated_top1.append(statistics.fmean(token_top1))
            passes.append(sum(values) / len(values))
        layer_means = {layer: statistics.fmean(v) for layer, v in per_layer_mass.items()}
        nan = float("nan")
        signals = {
            "mass": statistics.fmean(layer_means.values()),
            "mass_generated": statistics.fmean(generated_tokens) if generated_tokens else nan,
            "min_token_generated": min(generated_tokens) if generated_tokens else nan,
            "top1_generated": statistics.fmean(generated_top1) if generated_top1 else nan,
            "min_layer_generated": min(statistics.fmean(v) for v in generated_layers.values())
            if generated_tokens
            else nan,
            "mass_last_layer": layer_means[layers[-1]],
            "min_layer": min(layer_means.values()),
            "top1": statistics.fmean(statistics.fmean(v) for v in per_layer_top1.values()),
            "confidence": float(probabilities[row, : max(length, 1)].mean()),
        }
        right = get_task(example.task).score(example, answer)
        served.append(Served(pattern, example.task, bool(right), signals, passes))
    return served


def matrix(model_dir: Path, n: int, seed: int) -> list[Served]:
    """Every task's `n` prompts of split `seed` through every stored pattern."""
    from demo.tasks import TASK_NAMES, get_task
    from pattern_store.store import PatternStore
    from server.model.pooled import PooledModel, RowRoute
    from server.model.variant import VariantBuilder
    from server.patterns import load_tokenizer

    builder = VariantBuilder(model_dir, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    store = PatternStore(model_dir / "patterns")
    experts = max(layer.num_experts for layer in builder.sparse_layers.values())
    pooled = PooledModel(builder, slots=experts)
    for layer, sparse in pooled.layers.items():
        pooled.load(layer, list(range(sparse.num_experts)), list(range(sparse.num_experts)))
        for expert in range(sparse.num_experts):
            pooled.place(layer, expert, expert)
    served: list[Served] = []
    for name in TASK_NAMES:
        pattern = store.get(name)
        route = RowRoute(name, builder.kept_experts(pattern.selection))
        for task in TASK_NAMES:
            served += serve(pooled, tokenizer, route, get_task(task).examples(n, seed), name)
        print(f"  {name}: served {len(TASK_NAMES) * n} requests", file=sys.stderr, flush=True)
    return served


def auc(served: Sequence[Served], signal: str) -> float | None:
    from sklearn.metrics import roc_auc_score

    pairs = [(s.signals[signal], s.right) for s in served if s.signals[signal] == s.signals[signal]]
    labels = [right for _, right in pairs]
    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, [value for value, _ in pairs]))


BAND_EDGES = {"confidence": (0.9, 0.95, 0.98, 0.995)}
"""Where a signal's bands part (default: 0.6, 0.7, 0.8, 0.9); the confidence of most answers is above 0.9."""


def bands(served: Sequence[Served], signal: str) -> list[dict]:
    """Accuracy per band of `signal`, over every request of the matrix."""
    edges = BAND_EDGES.get(signal, (0.6, 0.7, 0.8, 0.9))
    found = []
    bounds = [0.0, *edges, 1.0000001]
    for low, high in itertools.pairwise(bounds):
        inside = [s for s in served if low <= s.signals[signal] < high]
        accuracy = sum(s.right for s in inside) / len(inside) if inside else None
        found.append({"low": low, "high": min(high, 1.0), "requests": len(inside), "accuracy": accuracy})
    return found


def replay(
    served: Sequence[Served], calibrated: float, rate: float, tolerance: float, limit: int, seed: int
) -> int | None:
    """The meter's flag replayed on `served` cycled as a stream of requests, each pass sampled at `rate`:
    the number of requests until the pattern is flagged (None: not within `limit`)."""
    from collections import deque

    from server.model.coverage_meter import MIN_SAMPLES, WINDOW

    rng = random.Random(seed)
    recent: deque[float] = deque(maxlen=WINDOW)
    for request in range(limit):
        for value in served[request % len(served)].passes[1:]:  # its decode steps, as the meter flags on
            if rng.random() < rate:
                recent.append(value)
        if len(recent) >= MIN_SAMPLES and sum(recent) / len(recent) < calibrated - tolerance:
            return request + 1
    return None


def flags(served: Sequence[Served], calibrated: dict[str, float], rate: float, tolerance: float) -> dict[str, Any]:
    """Per (pattern, task): requests until flagged: other tasks within 200 is the target; own tasks never
    within 2,000."""
    pairs: dict[str, Any] = {}
    for pattern in sorted(calibrated):
        for task in sorted({s.task for s in served}):
            stream = [s for s in served if s.pattern == pattern and s.task == task]
            limit = 2000 if task == pattern else 200
            pairs[f"{pattern}<-{task}"] = replay(stream, calibrated[pattern], rate, tolerance, limit, seed=len(pairs))
    own = {key: value for key, value in pairs.items() if key.split("<-")[0] == key.split("<-")[1]}
    other = {key: value for key, value in pairs.items() if key not in own}
    return {
        "tolerance": tolerance,
        "own_flagged_within_2000": sorted(key for key, value in own.items() if value is not None),
        "other_flagged_within_200": sum(value is not None for value in other.values()),
        "other_pairs": len(other),
        "requests_until_flagged": pairs,
    }


def _mean(values: Iterable[float]) -> float:
    """The mean of the values that are numbers (a request that generated nothing has no generated signal)."""
    return statistics.fmean(value for value in values if value == value)


def summarise(served: Sequence[Served]) -> dict[str, Any]:
    accuracy: dict[str, dict[str, float]] = {}
    for s in served:
        accuracy.setdefault(s.pattern, {}).setdefault(s.task, 0.0)
        accuracy[s.pattern][s.task] += s.right
    for pattern, tasks in accuracy.items():
        for task in tasks:
            tasks[task] /= sum(1 for s in served if s.pattern == pattern and s.task == task)
    return {
        "requests": len(served),
        "right": sum(s.right for s in served),
        "auc": {signal: auc(served, signal) for signal in SIGNALS},
        "accuracy": accuracy,
        "mean_signal": {
            signal: {
                "own_task": _mean(s.signals[signal] for s in served if s.pattern == s.task),
                "other_tasks": _mean(s.signals[signal] for s in served if s.pattern != s.task),
            }
            for signal in SIGNALS
        },
    }


AXIS_LABELS = {
    COVERAGE_SIGNAL: "coverage of the generated tokens (per request)",
    "confidence": "mean probability of the generated tokens (per request)",
}


def plot_bands(report: dict[str, Any], out: Path) -> None:
    """Accuracy by band of the report split, one bar per band with its number of requests: by coverage, and
    by the served model's confidence when it was the chosen signal. The picture of the operator's page
    (`docs/watching-patterns.md`)."""
    from matplotlib.figure import Figure

    from server.plots import save_figure

    shown = report["report"]
    panels = [(COVERAGE_SIGNAL, shown.get("coverage_bands", shown["bands"]))]
    if report["signal_chosen"] != COVERAGE_SIGNAL:
        panels.append((report["signal_chosen"], shown["bands"]))
    figure = Figure(figsize=(6.4 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (signal, signal_bands) in zip(axes, panels, strict=True):
        labels = [f"{band['low']:g}-{band['high']:g}" for band in signal_bands]
        accuracy = [100 * (band["accuracy"] or 0) for band in signal_bands]
        bars = ax.bar(labels, accuracy, color="#4c72b0")
        for bar, band in zip(bars, signal_bands, strict=True):
            ax.text(
                bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, f"n={band['requests']}", ha="center",
                fontsize=8,
            )  # fmt: skip
        ax.set_ylim(0, 105)
        ax.set_ylabel("answers right (%)", fontsize=9)
        ax.set_xlabel(AXIS_LABELS.get(signal, signal), fontsize=9)
        ax.set_title(f"ROC AUC {shown['auc'][signal]:.2f}", fontsize=10)
    figure.suptitle(f"{report['model']}: every task through every pattern", fontsize=11, fontweight="bold")
    save_figure(figure, out)


def main(argv: Sequence[str] | None = None) -> int:
    from pattern_store.coverage import reference_coverage
    from pattern_store.store import PatternStore
    from server.config import ServerConfig

    from _measured import measured

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-moe")
    parser.add_argument("-n", type=int, default=40, help="prompts per task and split")
    parser.add_argument("--choose-seed", type=int, default=CHOOSE_SEED)
    parser.add_argument("--report-seed", type=int, default=REPORT_SEED)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "coverage.json")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "images" / "coverage-accuracy.png")
    parser.add_argument("--replot", action="store_true", help="only draw the picture from --out's JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot_bands(json.loads(args.out.read_text()), args.picture)
        print(f"wrote {args.picture}")
        return 0
    store = PatternStore(args.model / "patterns")
    calibrated = {
        name: reference
        for name in store.names()
        if (reference := reference_coverage(store.get(name).parameters.get("coverage"))) is not None
    }
    rate = ServerConfig.model_fields["coverage_rate"].default
    shipped = ServerConfig.model_fields["coverage_tolerance"].default
    report: dict[str, Any] = {"model": args.model.name, "n": args.n, "rate": rate, "calibrated": calibrated}
    splits = {}
    for split, seed in (("choose", args.choose_seed), ("report", args.report_seed)):
        print(f"split {split} (seed {seed})", file=sys.stderr, flush=True)
        splits[split] = matrix(args.model, args.n, seed)
        report[split] = summarise(splits[split]) | {"seed": seed}
    candidates = [round(0.01 * step, 2) for step in range(1, 21)]
    chosen = [flags(splits["choose"], calibrated, rate, tolerance) for tolerance in candidates]
    clean = [entry for entry in chosen if not entry["own_flagged_within_2000"]]
    best = max(clean, key=lambda entry: (entry["other_flagged_within_200"], entry["tolerance"])) if clean else None
    report["choose"]["tolerances"] = [{k: v for k, v in e.items() if k != "requests_until_flagged"} for e in chosen]
    report["tolerance_chosen"] = best["tolerance"] if best else None
    report["report"]["flags_at_chosen"] = flags(splits["report"], calibrated, rate, best["tolerance"]) if best else None
    report["report"]["flags_at_shipped"] = flags(splits["report"], calibrated, rate, shipped)
    report["shipped_tolerance"] = shipped
    signal = max(SIGNALS, key=lambda name: report["choose"]["auc"][name] or 0.0)
    report["signal_chosen"] = signal
    report["report"]["bands"] = bands(splits["report"], signal)
    report["report"]["coverage_bands"] = bands(splits["report"], COVERAGE_SIGNAL)
    report["measured"] = measured()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot_bands(report, args.picture)
    print(json.dumps({k: report[k] for k in ("signal_chosen", "tolerance_chosen")}))
    for split in ("choose", "report"):
        print(split, {k: round(v, 3) if v else v for k, v in report[split]["auc"].items()})
    print("report flags at chosen:", {k: v for k, v in (report["report"]["flags_at_chosen"] or {}).items()
                                       if k != "requests_until_flagged"})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
