"""The demo models' architecture table for the docs, from each model directory's `config.json` and
`training.json` (the model cards, `models/*/README.md`, hold their accuracy and training time)."""

from __future__ import annotations

import json

from _results import ROOT, Report

MODELS = ROOT / "models"


def _feed_forward(config: Report) -> str:
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not experts:
        width = config["intermediate_size"]
        return f"dense MLPs of width {width} ({width / config['hidden_size']:.0f}x the hidden size)"
    text = f"{experts} routed experts of width {config['moe_intermediate_size']}, top-{config['num_experts_per_tok']}"
    if config.get("shared_expert_intermediate_size"):
        text += f", a shared expert of width {config['shared_expert_intermediate_size']}"
    return text


def demo_models() -> str:
    """One row per committed demo model: its transformers class, size and feed-forward shape."""
    lines = [
        "| model | architecture | layers | hidden size | feed-forward per layer | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for config_file in sorted(MODELS.glob("*/config.json")):
        config = json.loads(config_file.read_text())
        training = json.loads((config_file.parent / "training.json").read_text())
        lines.append(
            f"| [`models/{config_file.parent.name}`](../models/{config_file.parent.name}/README.md) | "
            f"`{config['architectures'][0]}` | {config['num_hidden_layers']} | {config['hidden_size']} | "
            f"{_feed_forward(config)} | {training['parameters'] / 1e6:.2f}M |"
        )
    return "\n".join(lines) + "\n"


_FORMATS = {"bf16": "bf16/fp16/fp32", "fp8-block": "block-FP8 (128 x 128, `weight_scale_inv`)", "mxfp4": "MXFP4"}


def supported_models() -> str:
    """The README's supported-models table, from `server.model.families.FAMILIES` itself: a family added there
    appears here, and a test fails while the page is stale."""
    from server.model.families import FAMILIES

    lines = [
        "| family | `model_type` | serves, for example | checkpoints | pruned by, routing |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        types = ", ".join(f"`{name}`" for name in family.model_types)
        hub = ", ".join(f"`{name}`" for name in family.hub_models)
        formats = ", ".join(_FORMATS[name] for name in family.formats)
        pruned = "experts (PreMoe, expert pool)" if family.kind == "moe" else "MLP channels (SEAP)"
        notes = f"{pruned}; {family.routing_notes}" if family.routing_notes else pruned
        lines.append(f"| {family.name} | {types} | {hub} | {formats} | {notes} |")
    return "\n".join(lines) + "\n"


def unsupported_models() -> str:
    """The MoE model types of the installed transformers that taskmoe does not serve, each with its reason."""
    from server.model.families import UNSUPPORTED_MOE

    lines = ["| `model_type` | why not |", "|---|---|"]
    lines += [f"| `{name}` | {reason} |" for name, reason in sorted(UNSUPPORTED_MOE.items())]
    return "\n".join(lines) + "\n"
