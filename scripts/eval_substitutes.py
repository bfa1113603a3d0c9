"""What should stand in for a pruned expert the router still chooses: measured on a choice split, kept only if it wins.

    python scripts/eval_substitutes.py [-n 200] [--keeps 0.5 0.25 0.125] [--out bench/results/substitutes.json]

For both MoE demo models, every task and each keep level, the REAP selection (uniform budget) of the task's 64
calibration exchanges (seed 7000) answers `-n` prompts of the choice seed 8100 (neither calibration's nor the
evaluation seed the reported tables use) with five things in place of a pruned expert's choice:

- nothing: the router chooses among the kept experts only (`--substitute none`);
- its novice: the mean of its output on the calibration tokens the full router sent to it, times the gate
  weight (MoNE; `--substitute novice`, what taskmoe ships);
- a low-rank novice, rank 4 and rank 16: the novice plus a linear map of the token, fitted by reduced-rank
  ridge regression of the expert's outputs on its inputs over the same tokens: n_j + (x - mean x_j) B_j, B_j of
  rank r (2 r H numbers per pruned expert instead of H);
- merging: the pruned expert is averaged, weights weighted by the gate mass the router gave each, into the kept
  expert whose outputs on the pruned expert's tokens are the most alike (mean cosine similarity), and its
  choices go to that expert (the merging literature's recipe; no memory beyond the kept experts).

The low-rank novices and merging are written here only: the product keeps what wins. Writes the JSON; the table
in docs/benchmarks-pruning.md is rendered from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from tqdm import tqdm

from demo.calibration import calibration_texts
from demo.evaluate import task_accuracy
from demo.tasks import CHOICE_SEED, TASK_NAMES, get_task
from pattern_store.selection import Selection
from server.model.calibrate import collect_statistics, expert_outputs
from server.model.novices import pruned_rows
from server.model.pruning import keep_count, moe_selection
from server.model.variant import VariantBuilder
from server.patterns import calibration_set, load_tokenizer, max_context

from _measured import measured

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("demo-moe", "demo-moe-fine")
RANKS = (4, 16)
SUBSTITUTES = ("none", "novice", *(f"low-rank {r}" for r in RANKS), "merge")
RIDGE = 1e-2  # ridge of the low-rank fit, relative to the mean variance of the inputs


class RoutedPairs:
    """Per sparse layer and expert: the inputs routed to it on the calibration exchanges, its outputs on them and
    the gate weights the full router gave it (hooks on the full model's experts modules)."""

    def __init__(self, builder: VariantBuilder, model: nn.Module, token_ids: Sequence[Sequence[int]]) -> None:
        self.inputs: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.outputs: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.gates: dict[int, torch.Tensor] = {}
        handles = []
        for layer, info in builder.sparse_layers.items():
            self.inputs[layer] = {e: [] for e in range(info.num_experts)}
            self.outputs[layer] = {e: [] for e in range(info.num_experts)}
            self.gates[layer] = torch.zeros(info.num_experts)
            handles.append(model.get_submodule(info.prefix).experts.register_forward_hook(self._hook(layer)))
        with torch.inference_mode():
            for ids in token_ids:
                model(torch.tensor([list(ids)]))
        for handle in handles:
            handle.remove()

    def _hook(self, layer: int) -> Callable[..., None]:
        def on_experts(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            hidden, index, weights = args[0], args[1], args[2]
            k = index.shape[-1]
            outputs = expert_outputs(module, hidden.repeat_interleave(k, dim=0), index.reshape(-1))
            rows = hidden.repeat_interleave(k, dim=0)
            for position, expert in enumerate(index.reshape(-1).tolist()):
                self.inputs[layer][expert].append(rows[position].float())
                self.outputs[layer][expert].append(outputs[position].float())
            self.gates[layer].index_add_(0, index.reshape(-1), weights.reshape(-1).float())

        return on_experts

    def pairs(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inputs[layer][expert], self.outputs[layer][expert]
        return (torch.stack(x), torch.stack(y)) if x else (torch.zeros(0), torch.zeros(0))


def low_rank_map(
    x: torch.Tensor, y: torch.Tensor, rank: int, hidden: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean x, mean y, B of rank <= `rank`): y ~ mean y + (x - mean x) B, by ridge regression whose fitted values
    are projected on their top `rank` directions (reduced-rank regression). Too few tokens: B = 0 (the novice,
    zeros for an expert never chosen)."""
    if x.shape[0] <= rank:
        mean_y = y.mean(0) if y.numel() else torch.zeros(hidden)
        return torch.zeros(hidden), mean_y, torch.zeros(hidden, hidden)
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = (x - mean_x).double(), (y - mean_y).double()
    gram = xc.T @ xc
    ridge = RIDGE * float(gram.diagonal().mean()) + 1e-8
    b = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    _, _, vh = torch.linalg.svd(xc @ b, full_matrices=False)
    top = vh[:rank].T  # [H, r]
    return mean_x, mean_y, (b @ top @ top.T).float()


class SubstitutedChoices:
    """Hooks on a full model's experts modules: in each pruned layer a choice of a kept expert runs it, a choice of
    a pruned expert adds gate weight x `substitute(layer, expert, tokens)`, or goes to another expert (`remap`)."""

    def __init__(
        self,
        builder: VariantBuilder,
        model: nn.Module,
        kept: Mapping[int, Sequence[int]],
        substitute: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
        remap: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        self.handles = []
        for layer, experts in kept.items():
            block = model.get_submodule(builder.sparse_layers[layer].prefix)
            substituted = torch.ones(builder.sparse_layers[layer].num_experts, dtype=torch.bool)
            substituted[list(experts)] = False
            pending: dict[str, Any] = {}

            def before(module, args, layer=layer, substituted=substituted, pending=pending):
                hidden, index, weights = args[0], args[1], args[2]
                if remap is not None:
                    return (hidden, remap[layer][index], weights, *args[3:])
                pending["args"] = (hidden, index, weights)
                return (hidden, index, weights.masked_fill(substituted[index], 0.0), *args[3:])

            def after(module, args, output, layer=layer, substituted=substituted, pending=pending):
                if "args" not in pending:
                    return None
                hidden, index, weights = pending.pop("args")
                added = torch.zeros_like(output)
                for expert in index[substituted[index]].unique().tolist():
                    tokens, slot = (index == expert).nonzero(as_tuple=True)
                    values = substitute(layer, expert, hidden[tokens])
                    added.index_add_(0, tokens, weights[tokens, slot, None].to(values.dtype) * values)
                return output + added.to(output.dtype)

            self.handles.append(block.experts.register_forward_pre_hook(before))
            if remap is None:
                self.handles.append(block.experts.register_forward_hook(after))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def merged_model(
    builder: VariantBuilder, pairs: RoutedPairs, kept: Mapping[int, Sequence[int]]
) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A full model whose kept experts absorb the pruned ones (gate-mass-weighted averages of their tensors), and
    per layer where each expert's choices go."""
    model = builder.build()
    remap = {}
    for layer, experts in kept.items():
        experts_module = model.get_submodule(builder.sparse_layers[layer].prefix).experts
        count = builder.sparse_layers[layer].num_experts
        target = torch.arange(count)
        for pruned in (e for e in range(count) if e not in set(experts)):
            x, y = pairs.pairs(layer, pruned)
            if not x.numel():  # never chosen on calibration: any kept expert will do
                target[pruned] = experts[0]
                continue
            with torch.inference_mode():
                similarity = {
                    e: float(
                        torch.nn.functional.cosine_similarity(
                            expert_outputs(experts_module, x, torch.full((x.shape[0],), e)).float(), y, dim=-1
                        ).mean()
                    )
                    for e in experts
                }
            target[pruned] = max(similarity, key=similarity.get)
        gates = pairs.gates[layer].clamp_min(1e-6)
        with torch.no_grad():
            for name in builder.family.expert_tensors:
                tensor = getattr(experts_module, name)
                merged = tensor.detach().clone()
                for keep in experts:
                    group = (target == keep).nonzero().flatten()
                    share = (gates[group] / gates[group].sum()).to(tensor.dtype)
                    merged[keep] = (share.view(-1, *([1] * (tensor.dim() - 1))) * tensor.detach()[group]).sum(0)
                tensor.data.copy_(merged)
        remap[layer] = target
    return model, remap


def evaluate(model_dir: Path, n: int, keeps: Sequence[float]) -> dict[str, Any]:
    builder = VariantBuilder(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    full = builder.build()
    examples = {task: get_task(task).examples(n, CHOICE_SEED) for task in TASK_NAMES}
    layer = next(iter(builder.sparse_layers.values()))
    hidden = int(builder.config.hidden_size)
    result: dict[str, Any] = {
        "full": {task: task_accuracy(full, tokenizer, examples[task])[task] for task in TASK_NAMES},
        "expert_floats": sum(math.prod(shape) for shape in layer.expert_shapes.values()),  # one expert's numbers
        # the numbers each pruned expert's substitute stores (low-rank: the novice, the inputs' mean, U and V)
        "substitute_floats": {"none": 0, "novice": hidden, "merge": 0}
        | {f"low-rank {r}": 2 * hidden + 2 * r * hidden for r in RANKS},
        "keeps": {},
    }
    num_experts = next(iter(builder.sparse_layers.values())).num_experts
    top_k = int(builder.config.num_experts_per_tok)
    prepared = {}
    for task in tqdm(TASK_NAMES, desc=f"{model_dir.name} calibration"):
        calibration = calibration_set(tokenizer, calibration_texts(task, 64), max_context(builder))
        stats = collect_statistics(builder, calibration.token_ids)
        pairs = RoutedPairs(builder, full, calibration.token_ids)
        fits = {
            rank: {
                layer: {e: low_rank_map(*pairs.pairs(layer, e), rank, hidden) for e in range(num_experts)}
                for layer in builder.sparse_layers
            }
            for rank in RANKS
        }
        prepared[task] = (stats, pairs, fits)
    for keep in keeps:
        k = keep_count(num_experts, top_k, keep_ratio=keep)
        rows: dict[str, dict[str, float]] = {name: {} for name in SUBSTITUTES}
        for task in tqdm(TASK_NAMES, desc=f"{model_dir.name} keep {keep}"):
            stats, pairs, fits = prepared[task]
            kept = dict(moe_selection(stats, k, "reap").selection.layers)

            def accuracy(model: Any, task: str = task) -> float:
                return task_accuracy(model, tokenizer, examples[task])[task]

            rows["none"][task] = accuracy(builder.build(Selection("moe_experts", kept)))
            novices = {layer: pruned_rows(stats.router[layer].novices(), e) for layer, e in kept.items()}
            rows["novice"][task] = accuracy(builder.build(Selection("moe_experts", kept, novices=novices)))
            for rank in RANKS:

                def substitute(layer: int, expert: int, x: torch.Tensor, fit=fits[rank]) -> torch.Tensor:
                    mean_x, mean_y, b = fit[layer][expert]
                    return mean_y + (x.float() - mean_x) @ b

                hooks = SubstitutedChoices(builder, full, kept, substitute=substitute)
                rows[f"low-rank {rank}"][task] = accuracy(full)
                hooks.close()
            merged, remap = merged_model(builder, pairs, kept)
            SubstitutedChoices(builder, merged, kept, remap=remap)
            rows["merge"][task] = accuracy(merged)
        result["keeps"][str(keep)] = {"experts_kept": k, "of": num_experts, "substitutes": rows}
        mean_full = sum(result["full"].values())
        print(
            f"{model_dir.name} keep {keep}: "
            + ", ".join(f"{name} {100 * sum(v.values()) / mean_full:.1f}%" for name, v in rows.items())
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("-n", type=int, default=200, help="choice-split prompts per task")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--only", choices=MODELS, help="one model")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "substitutes.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    started = time.perf_counter()
    report: dict[str, Any] = {"seed": CHOICE_SEED, "n": args.n, "method": "reap", "ranks": list(RANKS), "models": {}}
    for name in [args.only] if args.only else MODELS:
        report["models"][name] = evaluate(args.models / name, args.n, args.keeps)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["measured"] = measured()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
