"""Tables and findings of `scripts/eval_pruning.py` (`bench/results/pruning.json`, `served.json`) for the docs."""

from __future__ import annotations

import statistics
from typing import Any

from _results import RESULTS, Report, load

TASKS = ("arith", "reverse", "sort", "upper", "spell", "translate")
SCORES = ("tcess", "tcess-logit", "frequency", "reap", "ean", "easy-ep")
ROUTING_SCORES, OUTPUT_SCORES = SCORES[:3], SCORES[3:]
ANSWER_LOSS, LAYER_LOCAL = "answer-loss refinement", "layer-local refinement"
MOVED = "answer-loss refinement, moved budget"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean(values: dict[str, float]) -> float:
    return sum(values[t] for t in TASKS) / len(TASKS)


def relative(values: dict[str, float], full: dict[str, float]) -> tuple[float, float]:
    """(mean accuracy / the full model's mean, the lowest per-task ratio to the full model)."""
    worst = min(values[t] / full[t] if full[t] else 1.0 for t in TASKS)
    return _mean(values) / _mean(full), worst


def _levels(model: Report) -> list[str]:
    """The model's keep levels ("keep_0.5", ...), largest first."""
    return sorted((k for k in model if k.startswith("keep_")), key=lambda k: -float(k[5:]))


def _of_full(model: Report, level: str, method: str) -> float:
    return relative(model[level]["methods"][method], model["full"])[0]


def pruning_settings() -> str:
    """How the accuracy tables were made, from the report's settings."""
    s = load("pruning.json")["settings"]
    return (
        f"Every pattern is calibrated on {s['calibration_prompts_per_task']} generated exchanges of its task (seed "
        f"{s['calibration_seed']}, with their answers) and judged by greedy exact match on {s['examples_per_task']} "
        f"held-out examples per task (seed {s['evaluation_seed']}, never trained or calibrated on), "
        f"{s['torch_threads']} torch thread.\n"
    )


def pruning_moe() -> str:
    report = load("pruning.json")
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
        for key in _levels(model):
            block = model[key]
            for method, values in block["methods"].items():
                share, worst = relative(values, full)
                label = f"{method}, keep {block['experts_kept']}/{block['of']}"
                lines.append(
                    f"| {label} | "
                    + " | ".join(_pct(values[t]) for t in TASKS)
                    + f" | **{_pct(_mean(values))}** | {_pct(share)} | {_pct(worst)} |"
                )
        lines.append("")
    return "\n".join(lines)


def pruning_cross() -> str:
    report = load("pruning.json")
    lines = []
    for name, model in report["models"].items():
        for key in _levels(model):
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
    report = load("pruning.json")
    lines = [
        "| model | kept | kept experts' memory | recipe | median s per pattern | slowest s | widest layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model in report["models"].items():
        for key in _levels(model):
            block = model[key]
            memory = (
                f"{block['kept_expert_bytes'] / 2**20:.1f} of {block['all_expert_bytes'] / 2**20:.1f} MiB"
                if "kept_expert_bytes" in block
                else ""
            )
            for recipe, per_task in block["refinement_seconds"].items():
                novices = block.get("novice_bytes") if recipe.endswith("novices") else None
                cost = f"{memory} + {novices / 2**20:.2f} MiB novices" if novices else memory
                values = list(per_task.values())
                counts = block.get("experts_per_layer", {}).get(recipe, {})
                widest = max((n for c in counts.values() for n in c.values()), default=None)
                lines.append(
                    f"| {name} | {block['experts_kept']}/{block['of']} | {cost} | {recipe} | "
                    f"{statistics.median(values):.1f} | {max(values):.1f} | {widest or ''} |"
                )
    return "\n".join(lines) + "\n"


def pruning_dense() -> str:
    dense = load("pruning.json")["dense"]
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


def _best(model: dict[str, Any], key: str, name: str | None = None) -> tuple[str, float, float]:
    """The recipe with the highest mean at a keep level: (name, mean of full, worst task of full). With the
    model's `name`, the rows `eval_pruning.py --recipes` measured into `pruning_low_rank.json` compete too."""
    rows = {recipe: (values, model["full"]) for recipe, values in model[key]["methods"].items()}
    extra = substitute_rows(name, key) if name else None
    if extra is not None:
        rows |= {recipe: (values, extra[1]) for recipe, values in extra[0].items()}
    best = max(rows, key=lambda m: relative(*rows[m])[0])
    return (best, *relative(*rows[best]))


def _substitute_memory(model: str, key: str, recipe: str) -> str:
    """ ", in N% of the experts' memory" for a low-rank recipe (its maps cost memory beside the kept experts)."""
    if "low-rank" not in recipe:
        return ""
    block = load("pruning_low_rank.json")["models"][model][key]
    share = (block["kept_expert_bytes"] + block["low_rank_bytes"]) / block["all_expert_bytes"]
    return f", in {100 * share:.1f}% of the experts' memory"


def substitute_rows(model: str, key: str) -> tuple[dict[str, dict[str, float]], dict[str, float]] | None:
    """The novice and low-rank rows `eval_pruning.py --recipes` measured for `model` at `key` (a keep level), with
    the full model's accuracies; None when it measured none."""
    if not (RESULTS / "pruning_low_rank.json").is_file():
        return None
    found: dict[str, Any] = load("pruning_low_rank.json")["models"].get(model, {})
    return (found[key]["methods"], found["full"]) if key in found else None


def _slowest(models: Report) -> float:
    return max(
        value
        for model in models.values()
        for key in _levels(model)
        for per_task in model[key]["refinement_seconds"].values()
        for value in per_task.values()
    )


def _task_ratio(row: dict[str, float]) -> float:
    return row["routed_correct"] / row["full_correct"] if row["full_correct"] else 1.0


def pruning_targets() -> str:
    report = load("pruning.json")
    models, dense = report["models"], report["dense"]
    rows = []

    def row(target: str, measured: str, met: bool) -> None:
        rows.append(f"| {target} | {measured} | {'met' if met else 'missed'} |")

    if "demo-moe" in models:
        name, share, worst = _best(models["demo-moe"], "keep_0.5")
        row(
            "demo-moe, 50% kept: >= 99% of the full model's mean, >= 95% on every task",
            f"{_pct(share)}% of the mean, worst task {_pct(worst)}% ({name})",
            share >= 0.99 and worst >= 0.95,
        )
    quarter = {m: _best(models[m], "keep_0.25", m) for m in models if "keep_0.25" in models[m]}
    if quarter:
        shape = max(quarter, key=lambda m: (quarter[m][1] >= 0.9 and quarter[m][2] >= 0.8, quarter[m][1]))
        row(
            "25% kept: >= 90% of the full model's mean and every task >= 80% of its own, on either demo shape",
            "; ".join(
                f"{m}: {_pct(quarter[m][1])}%, worst task {_pct(quarter[m][2])}% ({quarter[m][0]}"
                f"{_substitute_memory(m, 'keep_0.25', quarter[m][0])})"
                for m in quarter
            ),
            quarter[shape][1] >= 0.9 and quarter[shape][2] >= 0.8,
        )
    if (RESULTS / "served.json").is_file():
        served = load("served.json")
        worst_task = min(served["tasks"], key=lambda t: _task_ratio(served["tasks"][t]))
        worst = _task_ratio(served["tasks"][worst_task])
        row(
            f"served routed by `{served['command']}`, >= 300 unseen prompts per task: >= 99.5% as often right as "
            "`@full`, every task >= 98%",
            f"{_pct(served['routed_correct'])}% vs {_pct(served['full_correct'])}% = {100 * served['ratio']:.2f}%, "
            f"worst task {worst_task} {100 * worst:.1f}% ({served['prompts_per_task']} prompts per task)",
            served["ratio"] >= 0.995 and worst >= 0.98 and served["prompts_per_task"] >= 300,
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
    slowest = _slowest(models)
    row("calibrating one refined pattern: <= 5 minutes on this CPU", f"slowest {slowest:.0f} s", slowest <= 300)
    return "\n".join(["| target | measured | result |", "|---|---|---|", *rows]) + "\n"


def _scores_finding(models: Report) -> str:
    """Output-aware scores against routing scores at half the experts, and which score wins each task."""
    half = {name: model for name, model in models.items() if "keep_0.5" in model}

    def best_of(model: Report, methods: tuple[str, ...]) -> float:
        return max(_of_full(model, "keep_0.5", m) for m in methods)

    ahead = all(best_of(m, OUTPUT_SCORES) > best_of(m, ROUTING_SCORES) for m in half.values())
    head = "Output-aware scores beat routing scores" if ahead else "Output-aware scores do not always beat routing ones"
    pairs = "; ".join(
        f"{name}: REAP {_pct(_of_full(m, 'keep_0.5', 'reap'))}%, TCESS {_pct(_of_full(m, 'keep_0.5', 'tcess'))}%"
        for name, m in half.items()
    )
    moe = models["demo-moe"]["keep_0.5"]["methods"]
    winners = {t: max(SCORES, key=lambda m: moe[m][t]) for t in TASKS}
    split = len(set(winners.values())) > 1
    return f"- **{head}.** Of the full model's mean accuracy at half the experts, {pairs}. " + (
        "No single score is best on every task (demo-moe at half: "
        + ", ".join(f"{t} {m}" for t, m in winners.items())
        + "), which is why the answer-loss refinement first chooses among all of them."
        if split
        else f"{winners[TASKS[0]]} is best on every task of demo-moe at half."
    )


def _refinement_finding(models: Report) -> str:
    parts = []
    for name, model in models.items():
        share, worst = relative(model["keep_0.5"]["methods"][ANSWER_LOSS], model["full"])
        moved, moved_worst = relative(model["keep_0.5"]["methods"][MOVED], model["full"])
        slowest = max(model["keep_0.5"]["refinement_seconds"][MOVED].values())
        parts.append(
            f"{name} {_pct(share)}% (worst task {_pct(worst)}%), with the budget moved {_pct(moved)}% (worst task "
            f"{_pct(moved_worst)}%, at most {slowest:.0f} s per pattern)"
        )
    moe = models["demo-moe"]
    return (
        "- **Refinement by the divergence from the full model at half the experts**, of the full model: "
        + "; ".join(parts)
        + ". The layer-local refinement gives "
        f"{_pct(_of_full(moe, 'keep_0.5', LAYER_LOCAL))}% on demo-moe against REAP's "
        f"{_pct(_of_full(moe, 'keep_0.5', 'reap'))}%: it lowers every layer's reconstruction error, which weighs every "
        "direction of the block's output alike, not the answer. It is still the only refinement for a model that "
        "does not fit in memory."
    )


def _moved_budget_finding(models: Report) -> str:
    """Where the moved budget puts the experts: the per-layer counts of the patterns at a quarter."""
    parts = []
    for name, model in models.items():
        counts = model.get("keep_0.25", {}).get("experts_per_layer", {}).get(MOVED)
        if counts:
            shown = ", ".join(f"{task} {'/'.join(str(n) for n in c.values())}" for task, c in counts.items())
            parts.append(f"{name} ({model['keep_0.25']['experts_kept']} per layer on average): {shown}")
    if not parts:
        return ""
    return (
        "- **Where the moved budget puts the experts** (per layer, first to last) at a quarter: "
        + "; ".join(parts)
        + ". Tasks differ in which layer needs the most, so no single per-layer shape serves every task."
    )


def _specialisation_finding(models: Report) -> str:
    own = cases = 0
    for model in models.values():
        for key in _levels(model):
            cross = model[key]["cross_task"]
            for task in TASKS:
                cases += 1
                own += cross[task][task] >= max(cross[p][task] for p in cross)
    agnostic = _of_full(models["demo-moe"], "keep_0.5", "task-agnostic")
    return (
        f"- **Task specialisation**: in the cross-task tables a task's own pattern serves it best (or tied) in {own} "
        f"of {cases} columns; the task-agnostic baseline (TCESS on all tasks pooled) keeps {_pct(agnostic)}% of "
        "demo-moe's full model at half the experts."
    )


def _quarter_finding(models: Report) -> str:
    parts = [
        f"{name} {_pct(rel)}%, worst task {_pct(worst)}% of its own ({recipe})"
        for name, (recipe, rel, worst) in _quarters(models).items()
    ]
    fine = models["demo-moe-fine"]
    upper = {key: max(block["upper"] for block in fine[key]["methods"].values()) for key in _levels(fine)}
    upper_text = ", ".join(f"{_pct(v)}% at {fine[k]['experts_kept']}/{fine[k]['of']}" for k, v in upper.items())
    met = max(rel for _, rel, _ in _quarters(models).values()) >= 0.9
    return (
        f"- **A quarter of the experts {'meets' if met else 'is short of'} the mean target.** The best recipe keeps "
        + "; ".join(parts)
        + f" of the full model. On demo-moe-fine's `upper`, the hardest task to prune, the best recipe answers "
        f"{upper_text}."
    )


def _quarters(models: Report) -> dict[str, tuple[str, float, float]]:
    return {name: _best(model, "keep_0.25", name) for name, model in models.items() if "keep_0.25" in model}


def _dense_finding(dense: Report) -> str:
    full = _mean(dense["full"])
    rows = {
        key: (_mean(dense[key]["methods"]["seap-expert"]), _mean(dense[key]["methods"]["magnitude"]))
        for key in sorted(k for k in dense if k.startswith("sparsity_"))
    }
    text = "; ".join(f"{round(100 * float(k[9:]))}%: SEAP {_pct(s)}, magnitude {_pct(m)}" for k, (s, m) in rows.items())
    return (
        f"- **SEAP against magnitude pruning** on demo-dense (full model {_pct(full)}), mean accuracy by sparsity: "
        f"{text}. SEAP's schedule leaves the first layer whole, so the other layers lose more than the global share."
    )


def pruning_findings() -> str:
    """What the accuracy tables show, each figure computed from them."""
    report = load("pruning.json")
    models = report["models"]
    fine = models["demo-moe-fine"]["full"]
    weakest = min(TASKS, key=lambda t: fine[t])
    lines = [
        _scores_finding(models),
        _refinement_finding(models),
        *filter(None, [_moved_budget_finding(models)]),
        _specialisation_finding(models),
        _quarter_finding(models),
        _dense_finding(report["dense"]),
        f"- **demo-moe-fine's weakest task is {weakest}, {_pct(fine[weakest])}% held out**"
        + (
            ": the misses are one-word translations, a shape most of whose prompts are in the held-out set, so "
            "training rarely sees it."
            if weakest == "translate"
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def refinement_choice() -> str:
    """The choice-split comparison the demo stores' recipe was chosen by (`scripts/choose_refinement.py`)."""
    report = load("refinement_choice.json")
    full = report["full"]
    lines = [
        f"**{report['model']}**, {report['n']} prompts per task of the choice seed {report['seed']}: greedy exact "
        "match (%)",
        "",
        "| kept | answer loss | " + " | ".join(TASKS) + " | mean | of full | experts per layer (translate) |",
        "|---|---|" + "---|" * (len(TASKS) + 3),
        "| all | full model | " + " | ".join(_pct(full[t]) for t in TASKS) + f" | **{_pct(_mean(full))}** | 100.0 | |",
    ]
    for keep, rows in report["keeps"].items():
        for label, per_task in rows.items():
            values = {t: per_task[t]["accuracy"] for t in TASKS}
            shape = "/".join(str(n) for n in per_task["translate"]["experts_per_layer"].values())
            lines.append(
                f"| {round(100 * float(keep), 1):g}% | {label} | "
                + " | ".join(_pct(values[t]) for t in TASKS)
                + f" | **{_pct(_mean(values))}** | {_pct(relative(values, full)[0])} | {shape} |"
            )
    return "\n".join(lines) + "\n"
