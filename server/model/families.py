"""One small adapter per model family: where its routed experts, router and MLP channels live.

transformers (v5) keeps the routed experts of every supported MoE family in one module layout:
`<layer>.mlp.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I], with the router's weight at
`<layer>.mlp.gate.weight` [E, H]. Checkpoints differ: most store one tensor per expert under family
specific names (Mixtral's `block_sparse_moe.experts.N.w1`), some store the fused tensors. An adapter
says how to find each in the checkpoint, which config field counts the experts, and what the router
needs to stay equivalent after pruning. Adding a family is one more `Family(...)` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pattern_store.selection import SelectionError


class UnsupportedModelError(ValueError):
    """A `model_type` that no adapter covers; the message lists the supported families."""


def _no_extra_check(config: Any, layer: int, kept: Sequence[int]) -> dict[str, Any]:
    return {}


def _no_groups(config: Any) -> int:
    return 1


@dataclass(frozen=True)
class Family:
    """How one architecture stores and routes its experts (MoE) or its MLP channels (dense)."""

    name: str
    model_types: tuple[str, ...]
    kind: str  # "moe" or "dense"
    #: config field that counts routed experts (the one written into an exported config)
    experts_field: str = ""
    #: per-expert projection names in checkpoints: gate, up, down
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    #: (module fragment, checkpoint fragment) pairs: names the checkpoint may use instead of the module's
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    #: router tensors besides `weight` that hold one value per expert (selection bias)
    router_expert_buffers: tuple[str, ...] = ()
    #: how router logits become gating weights: "softmax" or "sigmoid"
    router_activation: str = "softmax"
    #: checks a selection of one layer against the routing rule; returns config overrides the variant needs
    routing_overrides: Callable[[Any, int, Sequence[int]], dict[str, Any]] = field(default=_no_extra_check)
    #: how many equal groups of experts must each keep the same number (1: no constraint)
    balanced_groups: Callable[[Any], int] = field(default=_no_groups)

    def checkpoint_candidates(self, module_name: str) -> list[str]:
        """Names under which the checkpoint may hold the tensor the module tree calls `module_name`."""
        names = [module_name]
        for module_fragment, checkpoint_fragment in self.checkpoint_renames:
            if module_fragment in module_name:
                names.append(module_name.replace(module_fragment, checkpoint_fragment))
        return names


def _deepseek_groups(config: Any, layer: int, kept: Sequence[int]) -> dict[str, Any]:
    """Group-limited routing picks `topk_group` of `n_group` equal groups of experts, scoring each group by
    its two best experts. A variant keeps that rule only if every group keeps the same number (two or
    more) of its experts; when every group may be picked anyway (`topk_group == n_group`) the groups do
    not matter and the variant uses a single group."""
    n_group, topk_group = int(config.n_group or 1), int(config.topk_group or 1)
    if topk_group >= n_group:
        return {"n_group": 1, "topk_group": 1}
    per_group = config.n_routed_experts // n_group
    counts = [0] * n_group
    for expert in kept:
        counts[expert // per_group] += 1
    if len(set(counts)) != 1 or counts[0] < 2:
        raise SelectionError(
            f"layer {layer}: group-limited routing ({n_group} groups, {topk_group} picked per token) needs the "
            f"same number, at least 2, of kept experts in every group; this selection keeps {counts}"
        )
    return {}


def _deepseek_balanced_groups(config: Any) -> int:
    """Group-limited routing stays exact when every group keeps the same number of experts (see above)."""
    n_group, topk_group = int(config.n_group or 1), int(config.topk_group or 1)
    return n_group if topk_group < n_group else 1


FAMILIES: tuple[Family, ...] = (
    Family("Qwen3-MoE", ("qwen3_moe",), "moe", experts_field="num_experts"),
    Family("Qwen2-MoE", ("qwen2_moe",), "moe", experts_field="num_experts"),
    Family("OLMoE", ("olmoe",), "moe", experts_field="num_experts"),
    Family(
        "Mixtral",
        ("mixtral",),
        "moe",
        experts_field="num_local_experts",
        expert_projections=("w1", "w3", "w2"),
        checkpoint_renames=((".mlp.", ".block_sparse_moe."),),
    ),
    Family(
        "DeepSeek-V3",
        ("deepseek_v3",),
        "moe",
        experts_field="n_routed_experts",
        router_expert_buffers=("e_score_correction_bias",),
        router_activation="sigmoid",
        routing_overrides=_deepseek_groups,
        balanced_groups=_deepseek_balanced_groups,
    ),
    # hybrid attention: linear-attention layers (gated DeltaNet, lightning attention) between full attention
    Family("Qwen3-Next", ("qwen3_next",), "moe", experts_field="num_experts"),
    Family(
        "Qwen3.5-MoE",
        ("qwen3_5_moe", "qwen3_5_moe_text"),  # the multimodal release's config, and its text model's
        "moe",
        experts_field="num_experts",
        checkpoint_renames=(("model.", "model.language_model."),),  # the release nests the text model
    ),
    Family(
        "MiniMax",
        ("minimax",),
        "moe",
        experts_field="num_local_experts",
        expert_projections=("w1", "w3", "w2"),
        checkpoint_renames=((".mlp.", ".block_sparse_moe."),),
    ),
    Family("Llama", ("llama",), "dense"),
    Family("Qwen2", ("qwen2",), "dense"),
    Family("Qwen3", ("qwen3",), "dense"),
    Family("Mistral", ("mistral",), "dense"),
)


def supported_families() -> str:
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_for(model_type: str) -> Family:
    """The adapter of `model_type`, or a clear error that lists what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported families: {supported_families()}"
    )
