"""The model card (README.md) of a demo model, written from its training report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from demo.tasks import TASKS


def _architecture(config: Any) -> str:
    lines = [
        f"- `{type(config).__name__}` (`model_type: {config.model_type}`), "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"{config.num_attention_heads} attention heads ({config.num_key_value_heads} key/value heads), "
        f"tied embeddings, vocabulary {config.vocab_size} (one token per character)",
    ]
    if getattr(config, "num_experts", None):
        shared = getattr(config, "shared_expert_intermediate_size", 0)
        lines.append(
            f"- every layer is sparse: {config.num_experts} routed experts of width "
            f"{config.moe_intermediate_size}, top-{config.num_experts_per_tok} routing "
            f"(`norm_topk_prob: {config.norm_topk_prob}`), router auxiliary loss coefficient "
            f"{config.router_aux_loss_coef}"
            + (f", and a shared expert of width {shared} that every token uses" if shared else "")
        )
    else:
        lines.append(f"- dense MLPs of width {config.intermediate_size} (SiLU-gated)")
    return "\n".join(lines)


def write_model_card(directory: Path, config: Any, report: dict[str, Any]) -> None:
    """Write `directory/README.md`: architecture, tasks, command, training time, accuracy."""
    name = directory.name
    accuracy: dict[str, float] = report["accuracy"]
    task_rows = "\n".join(f"| `{t.name}` | {t.description} | {t.examples(1, 0)[0].prompt} |" for t in TASKS)
    acc_rows = "\n".join(f"| `{task}` | {100 * acc:.1f}% |" for task, acc in accuracy.items())
    size_mb = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6
    sections = [
        f"# {name}\n\nA small demo model of taskmoe, trained from scratch on CPU on the synthetic demo "
        "tasks of `demo/tasks.py`. It exists to develop, test and demonstrate task-specific "
        "pruning; it knows nothing else.",
        f"## Architecture\n\n{_architecture(config)}\n- {report['parameters'] / 1e6:.2f}M parameters, "
        f"{size_mb:.1f} MB of float32 safetensors\n- a character tokenizer built with `tokenizers`, "
        "with a chat template (`<|user|>...<|end|><|assistant|>`); generation ends at `<|end|>`",
        f"## Tasks\n\n| task | what | example prompt |\n|---|---|---|\n{task_rows}",
        "## Training\n\n"
        f"```\n{report['command']}\n```\n\n"
        f"{report['steps']} steps of AdamW (batch {report['batch_size']}, peak learning rate {report['lr']}, "
        f"weight decay {report.get('weight_decay', 0.01)}, seed {report['seed']}); the loss counts only answer "
        "tokens, and tasks are drawn in proportion to their running loss. "
        f"Training took **{report['train_seconds'] / 60:.1f} minutes** on "
        f"{report['torch_threads']} CPU threads"
        + (
            f" ({report['train_cpu_seconds'] / 60:.1f} minutes of CPU time)"
            if report.get("train_cpu_seconds") is not None
            else ""
        )
        + ". The held-out prompts below are never trained on.",
        f"## Held-out accuracy\n\nGreedy exact match on {report['eval_examples_per_task']} held-out "
        "examples per task (`taskmoe eval models/" + name + "`):\n\n"
        f"| task | accuracy |\n|---|---|\n{acc_rows}",
    ]
    specialisation: dict[str, list[float]] | None = report.get("specialisation")
    if specialisation:
        n_layers = len(next(iter(specialisation.values())))
        header = "| task | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |"
        rule = "|---|" + "---|" * n_layers
        rows = "\n".join(
            f"| `{task}` | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |"
            for task, shares in specialisation.items()
        )
        sections.append(
            "## Task specialisation of the routing\n\nFor each task and layer: the share of the task's "
            "routing mass (the gating weight of each selected expert, summed over the task's tokens) "
            "that goes to the task's top half of experts. A router that spreads a task evenly gives "
            f"50%.\n\n{header}\n{rule}\n{rows}"
        )
    (directory / "README.md").write_text("\n\n".join(sections) + "\n")
