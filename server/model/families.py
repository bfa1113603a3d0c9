"""One small adapter per model family: where its routed experts, router and MLP channels live.

transformers (v5) keeps the routed experts of every supported MoE family in one fused experts module,
`<block>.experts`, with one slice per expert in each of its tensors: `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I] in most families, the transposed [E, H, 2I] and [E, I, H] with expert biases in
gpt-oss. The block's router (`gate` in most, `router` in some) holds a weight row per expert, and some
families keep more per-expert router tensors (a selection bias on the router, on a child module of it, or
on the block, passed to the router as an argument). Checkpoints differ: most store one tensor per expert
under family specific names (Mixtral's `block_sparse_moe.experts.N.w1`), some store the fused tensors.
An adapter says all of this as data: how to find each tensor in the checkpoint, which config field counts
the experts, and what the router needs to stay equivalent after pruning. Adding a family is one more
`Family(...)` entry; a MoE model type of transformers that cannot be served is listed in `UNSUPPORTED_MOE`
with the reason.
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
class ExpertTensor:
    """A tensor outside the experts module with one slice per routed expert (a router's weight rows, a
    selection bias): a pruned router keeps the kept experts' slices."""

    #: the tensor's name under its owner: "weight", "wg.weight", "moe_statics.e_score_correction_bias"
    path: str
    #: the dimension that counts experts (ERNIE's selection bias is [1, E])
    dim: int = 0
    #: "router" (the block's router module) or "block" (the MoE block, which passes it to the router)
    owner: str = "router"
    #: kept in the checkpoint's precision (selection biases are float32 in every release) rather than the
    #: target dtype
    keep_dtype: bool = False

    @property
    def selects(self) -> bool:
        """A selection bias: added to the scores that choose experts, not to the gate weights."""
        return self.path.endswith("e_score_correction_bias")


ROUTER_WEIGHT = ExpertTensor("weight")
SELECTION_BIAS = ExpertTensor("e_score_correction_bias", keep_dtype=True)


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
    #: the MoE block's attribute that holds its router
    router: str = "gate"
    #: the router's per-expert tensors, its weight first
    router_tensors: tuple[ExpertTensor, ...] = (ROUTER_WEIGHT,)
    #: block-owned router tensors passed to the router's forward after the hidden states, in order
    router_arguments: tuple[str, ...] = ()
    #: the experts module's per-expert tensors: the projections, then any expert biases
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")
    #: "gate_up_rows": gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I];
    #: "transposed": gate_up_proj [E, H, 2I] and down_proj [E, I, H] (gpt-oss)
    experts_layout: str = "gate_up_rows"
    #: how router logits become gating weights (calibration's routing scores): "softmax" or "sigmoid"
    router_activation: str = "softmax"
    #: checks a selection of one layer against the routing rule; returns config overrides the variant needs
    routing_overrides: Callable[[Any, int, Sequence[int]], dict[str, Any]] = field(default=_no_extra_check)
    #: how many equal groups of experts must each keep the same number (1: no constraint)
    balanced_groups: Callable[[Any], int] = field(default=_no_groups)
    #: hub repositories this family serves (for the README's table)
    hub_models: tuple[str, ...] = ()
    #: checkpoint formats its releases ship: "bf16", "fp8-block", "mxfp4"
    formats: tuple[str, ...] = ("bf16",)
    #: the routing rule in a few words (for the README's table)
    routing_notes: str = ""

    def checkpoint_candidates(self, module_name: str) -> list[str]:
        """Names under which the checkpoint may hold the tensor the module tree calls `module_name`."""
        names = [module_name]
        for module_fragment, checkpoint_fragment in self.checkpoint_renames:
            if module_fragment in module_name:
                names.append(module_name.replace(module_fragment, checkpoint_fragment))
        return names

    def router_tensor_name(self, block_prefix: str, tensor: ExpertTensor) -> str:
        """The module name of one per-expert router tensor of the block at `block_prefix`."""
        owner = block_prefix if tensor.owner == "block" else f"{block_prefix}.{self.router}"
        return f"{owner}.{tensor.path}"

    @property
    def expert_biases(self) -> tuple[str, ...]:
        """The experts module's per-expert tensors beyond its two projections (gpt-oss's biases)."""
        return self.expert_tensors[2:]


def num_experts(config: Any) -> int:
    """The routed-expert count of a MoE config, whichever field its family names it by."""
    for name in ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"{type(config).__name__} names no routed-expert count")


def _balanced_counts(config: Any, layer: int, kept: Sequence[int], rule: str, minimum: int) -> None:
    """Group-limited routing over a pruned router stays exact when every group keeps the same number (at
    least `minimum`) of its experts, and the picked groups hold at least the top-k."""
    n_group, topk_group = int(config.n_group or 1), int(config.topk_group or 1)
    per_group = num_experts(config) // n_group
    counts = [0] * n_group
    for expert in kept:
        counts[expert // per_group] += 1
    if len(set(counts)) != 1 or counts[0] < minimum or counts[0] * topk_group < int(config.num_experts_per_tok):
        raise SelectionError(
            f"layer {layer}: group-limited routing ({n_group} groups, {topk_group} picked per token, {rule}) needs "
            f"the same number, at least {minimum} and together top-k, of kept experts in every group; this selection "
            f"keeps {counts}"
        )


def _deepseek_groups(config: Any, layer: int, kept: Sequence[int]) -> dict[str, Any]:
    """Group-limited routing picks `topk_group` of `n_group` equal groups of experts, scoring each group by
    its two best experts. A variant keeps that rule only if every group keeps the same number (two or
    more) of its experts; when every group may be picked anyway (`topk_group == n_group`) the groups do
    not matter and the variant uses a single group."""
    n_group, topk_group = int(config.n_group or 1), int(config.topk_group or 1)
    if topk_group >= n_group:
        return {"n_group": 1, "topk_group": 1}
    _balanced_counts(config, layer, kept, "groups scored by their two best experts", 2)
    return {}


def _deepseek_balanced_groups(config: Any) -> int:
    """Group-limited routing stays exact when every group keeps the same number of experts (see above)."""
    n_group, topk_group = int(config.n_group or 1), int(config.topk_group or 1)
    return n_group if topk_group < n_group else 1


def _deepseek_v2_groups(config: Any, layer: int, kept: Sequence[int]) -> dict[str, Any]:
    """DeepSeek-V2's `group_limited_greedy` scores each group by its best expert's probability and picks
    `topk_group` groups; its plain `greedy` has no groups. The same balance keeps the groups exact."""
    if getattr(config, "topk_method", "greedy") != "group_limited_greedy":
        return {}
    n_group, topk_group = int(config.n_group or 1), int(config.topk_group or 1)
    if topk_group >= n_group:
        return {"n_group": 1, "topk_group": 1}
    _balanced_counts(config, layer, kept, "groups scored by their best expert", 1)
    return {}


def _deepseek_v2_balanced_groups(config: Any) -> int:
    if getattr(config, "topk_method", "greedy") != "group_limited_greedy":
        return 1
    return _deepseek_balanced_groups(config)


def _deepseek_like(name: str, model_types: tuple[str, ...], experts_field: str, **notes: Any) -> Family:
    """DeepSeek-V3's router: sigmoid scores, a selection bias, group-limited routing."""
    return Family(
        name,
        model_types,
        "moe",
        experts_field=experts_field,
        router_tensors=(ROUTER_WEIGHT, SELECTION_BIAS),
        router_activation="sigmoid",
        routing_overrides=_deepseek_groups,
        balanced_groups=_deepseek_balanced_groups,
        **notes,
    )


#: Mixtral's checkpoint layout: `block_sparse_moe.experts.N.w1/w3/w2` (gate, up, down)
_MIXTRAL_NAMES: dict[str, Any] = dict(
    expert_projections=("w1", "w3", "w2"), checkpoint_renames=((".mlp.", ".block_sparse_moe."),)
)
_SIGMOID_GROUPS = "sigmoid scores + selection bias, group-limited top-k, normalised, scaled"

FAMILIES: tuple[Family, ...] = (
    Family(
        "Qwen3-MoE",
        ("qwen3_moe",),
        "moe",
        experts_field="num_experts",
        hub_models=("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-30B-A3B-FP8"),
        formats=("bf16", "fp8-block"),
        routing_notes="softmax top-k, normalised",
    ),
    Family(
        "Qwen2-MoE",
        ("qwen2_moe",),
        "moe",
        experts_field="num_experts",
        hub_models=("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B"),
        routing_notes="softmax top-k; shared expert with a sigmoid gate",
    ),
    Family(
        "OLMoE",
        ("olmoe",),
        "moe",
        experts_field="num_experts",
        hub_models=("allenai/OLMoE-1B-7B-0924",),
        routing_notes="softmax top-k",
    ),
    Family(
        "Mixtral",
        ("mixtral",),
        "moe",
        experts_field="num_local_experts",
        **_MIXTRAL_NAMES,
        hub_models=("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x22B-Instruct-v0.1"),
        routing_notes="softmax top-k, normalised",
    ),
    _deepseek_like(
        "DeepSeek-V3",
        ("deepseek_v3",),
        "n_routed_experts",
        hub_models=("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-V3-0324"),
        formats=("fp8-block",),
        routing_notes=_SIGMOID_GROUPS + "; shared expert; dense first layers",
    ),
    _deepseek_like(
        "GLM-4.5",
        ("glm4_moe",),
        "n_routed_experts",
        hub_models=("zai-org/GLM-4.5-Air", "zai-org/GLM-4.5", "zai-org/GLM-4.6", "zai-org/GLM-4.5-Air-FP8"),
        formats=("bf16", "fp8-block"),
        routing_notes=_SIGMOID_GROUPS + "; shared expert; dense first layers",
    ),
    _deepseek_like(
        "GLM-4.7-Flash",
        ("glm4_moe_lite",),
        "n_routed_experts",
        hub_models=("zai-org/GLM-4.7-Flash",),
        routing_notes=_SIGMOID_GROUPS + "; MLA attention; shared expert",
    ),
    _deepseek_like(
        "dots.llm1",
        ("dots1",),
        "n_routed_experts",
        hub_models=("rednote-hilab/dots.llm1.inst",),
        routing_notes=_SIGMOID_GROUPS + "; shared experts",
    ),
    Family(
        "EXAONE-MoE",
        ("exaone_moe",),
        "moe",
        experts_field="num_experts",
        # its releases keep the selection bias on the block; transformers moves it into the router
        checkpoint_renames=((".gate.e_score_correction_bias", ".e_score_correction_bias"),),
        router_tensors=(ROUTER_WEIGHT, SELECTION_BIAS),
        router_activation="sigmoid",
        routing_overrides=_deepseek_groups,
        balanced_groups=_deepseek_balanced_groups,
        hub_models=("LGAI-EXAONE/K-EXAONE-236B-A23B",),
        routing_notes=_SIGMOID_GROUPS + "; shared expert",
    ),
    Family(
        "DeepSeek-V2",
        ("deepseek_v2",),
        "moe",
        experts_field="n_routed_experts",
        routing_overrides=_deepseek_v2_groups,
        balanced_groups=_deepseek_v2_balanced_groups,
        hub_models=("deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2.5"),
        routing_notes="softmax top-k (greedy or group-limited by each group's best), scaled; shared experts",
    ),
    Family(
        "ERNIE-4.5-MoE",
        ("ernie4_5_moe",),
        "moe",
        experts_field="moe_num_experts",
        checkpoint_renames=((".gate.moe_statics.", ".moe_statics."),),
        router_tensors=(ROUTER_WEIGHT, ExpertTensor("moe_statics.e_score_correction_bias", dim=1, keep_dtype=True)),
        hub_models=("baidu/ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-300B-A47B-PT"),
        routing_notes="softmax, selection bias added to the probabilities, top-k normalised; shared experts",
    ),
    Family(
        "Hunyuan-MoE",
        ("hunyuan_v1_moe",),
        "moe",
        experts_field="num_experts",
        router_tensors=(ExpertTensor("wg.weight"),),
        hub_models=("tencent/Hunyuan-A13B-Instruct",),
        routing_notes="softmax top-k, normalised; shared MLP in every layer",
    ),
    Family(
        "GraniteMoE",
        ("granitemoe", "granitemoeshared"),
        "moe",
        experts_field="num_local_experts",
        checkpoint_renames=(
            (".experts.gate_up_proj", ".input_linear.weight"),
            (".experts.down_proj", ".output_linear.weight"),
            (".router.weight", ".router.layer.weight"),
        ),
        router="router",
        hub_models=("ibm-granite/granite-3.1-3b-a800m-instruct", "ibm-research/moe-7b-1b-active-shared-experts"),
        routing_notes="top-k logits, softmax over the chosen",
    ),
    Family(
        "PhiMoE",
        ("phimoe",),
        "moe",
        experts_field="num_local_experts",
        expert_projections=("w1", "w3", "w2"),
        checkpoint_renames=((".mlp.router.", ".block_sparse_moe.gate."), (".mlp.", ".block_sparse_moe.")),
        router="router",
        hub_models=("microsoft/Phi-3.5-MoE-instruct", "microsoft/Phi-tiny-MoE-instruct"),
        routing_notes="sparsemixer top-2 (each pick a softmax over the experts within its jitter threshold)",
    ),
    Family(
        "gpt-oss",
        ("gpt_oss",),
        "moe",
        experts_field="num_local_experts",
        router="router",
        router_tensors=(ROUTER_WEIGHT, ExpertTensor("bias")),
        expert_tensors=("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"),
        experts_layout="transposed",
        hub_models=("openai/gpt-oss-20b", "openai/gpt-oss-120b"),
        formats=("mxfp4",),
        routing_notes="top-k of biased logits, softmax over the chosen; expert biases, clamped SwiGLU",
    ),
    Family(
        "MiniMax-M2",
        ("minimax_m2",),
        "moe",
        experts_field="num_local_experts",
        **_MIXTRAL_NAMES,
        router_tensors=(ROUTER_WEIGHT, ExpertTensor("e_score_correction_bias", owner="block", keep_dtype=True)),
        router_arguments=("e_score_correction_bias",),
        router_activation="sigmoid",
        hub_models=("MiniMaxAI/MiniMax-M2",),
        formats=("fp8-block",),
        routing_notes="sigmoid scores + selection bias (on the block), top-k normalised",
    ),
    # hybrid attention: linear-attention layers (gated DeltaNet, lightning attention) between full attention
    Family(
        "Qwen3-Next",
        ("qwen3_next",),
        "moe",
        experts_field="num_experts",
        hub_models=("Qwen/Qwen3-Next-80B-A3B-Instruct", "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8"),
        formats=("bf16", "fp8-block"),
        routing_notes="softmax top-k, normalised; shared expert with a sigmoid gate; gated DeltaNet layers",
    ),
    Family(
        "Qwen3.5-MoE",
        ("qwen3_5_moe", "qwen3_5_moe_text"),  # the multimodal release's config, and its text model's
        "moe",
        experts_field="num_experts",
        checkpoint_renames=(("model.", "model.language_model."),),  # the release nests the text model
        hub_models=("Qwen/Qwen3.5-35B-A3B",),
        routing_notes="softmax top-k, normalised; shared expert with a sigmoid gate; gated DeltaNet layers; "
        "the text model of the multimodal release",
    ),
    Family(
        "MiniMax",
        ("minimax",),
        "moe",
        experts_field="num_local_experts",
        **_MIXTRAL_NAMES,
        hub_models=("MiniMaxAI/MiniMax-Text-01-hf",),
        routing_notes="softmax top-k, normalised; lightning (linear) attention layers",
    ),
    Family("Llama", ("llama",), "dense", hub_models=("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-2-7b-hf")),
    Family("Qwen2", ("qwen2",), "dense", hub_models=("Qwen/Qwen2.5-7B-Instruct",)),
    Family("Qwen3", ("qwen3",), "dense", hub_models=("Qwen/Qwen3-8B",)),
    Family("Mistral", ("mistral",), "dense", hub_models=("mistralai/Mistral-7B-Instruct-v0.3",)),
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


_HYBRID = (
    "hybrid layers: some decoder layers mix tokens by {0} instead of attention, with their own cache state; not "
    "adapted yet (the hybrids served, Qwen3-Next, Qwen3.5 and MiniMax, keep gated DeltaNet or lightning states "
    "whose rows cache_rows joins; this one has no Family entry, no cache-row check and no contract tests)"
)
_WRAPPER = (
    "multimodal model (text decoder inside a {0} wrapper, config with text_config); serving, calibration and "
    "export handle text-only causal LMs"
)
_NOT_ADAPTED = (
    "not adapted yet: fused experts like the supported families' (gate_up_proj), but its router ({0}) has no "
    "Family entry, no restricted-router check and no tiny-checkpoint contract tests"
)

#: MoE model types of transformers that no family serves, each with the reason (checked in the modeling code)
UNSUPPORTED_MOE: dict[str, str] = {
    # routing or experts that a pruned router over kept experts cannot reproduce, or a different experts module
    "deepseek_v4": "hash routing in its first MoE layers (DeepseekV4HashRouter picks experts by token id, not by "
    "scores), so a pruned expert cannot be made unselectable",
    "longcat_flash": "zero-computation experts: the router also picks 'zero experts' that return the input, counted "
    "among the routed experts; an expert pattern would have to treat them apart",
    "zaya": "the router has a skip class beside the experts (num_experts + 1 choices, a skip expert without compute)",
    "doge": "cross-domain MoE: product-key retrieval over 16384 single-neuron experts, no fused experts module",
    "jetmoe": "mixture of attention heads (JetMoeMoA) beside the MLP experts, and JetMoeParallelExperts' own layout "
    "(input_linear/output_linear per expert, no gate_up_proj)",
    "dbrx": "its own experts layout (DbrxExperts holding a DbrxExpertGLU with w1/v1/w2 as [E*I, H]), no gate_up_proj",
    "llama4_text": "the experts take every expert's router-scaled copy of the input at once (Llama4TextExperts.forward "
    "(routed_in)), not (hidden, top_k_index, top_k_weights); the masking contract does not apply as is",
    "llama4": "multimodal wrapper of llama4_text, whose experts take router-scaled inputs (see llama4_text)",
    "flex_olmo": "post-norm decoder layers (the MoE output is normalised before the residual add, no norm before the "
    "block): calibration's residual statistics (EASY-EP) read the pre-norm residual; not adapted",
    # hybrid sequence mixers
    "qwen4_exp": _HYBRID.format("Gated DeltaNet and short convolutions"),
    "qwen4_exp_text": _HYBRID.format("Gated DeltaNet and short convolutions"),
    "jamba": _HYBRID.format("Mamba"),
    "nemotron_h": _HYBRID.format("Mamba-2"),
    "granitemoehybrid": _HYBRID.format("Mamba-2"),
    "bailing_hybrid": _HYBRID.format("linear attention"),
    "kimi_linear": _HYBRID.format("Kimi Delta Attention"),
    "lara_mini": _HYBRID.format("Gated DeltaNet"),
    "lfm2_moe": _HYBRID.format("short convolutions"),
    "inkling_text": _HYBRID.format("short convolutions"),
    "inkling2_text": _HYBRID.format("short convolutions"),
    "inkling2_loop_text": _HYBRID.format("short convolutions") + ", and looped layers",
    "glm5_next_text": _HYBRID.format("linear attention"),
    # multimodal wrappers and their text decoders without a causal-LM class of their own
    **{
        model_type: _WRAPPER.format(kind)
        for model_type, kind in {
            "aria": "vision",
            "deepseek_ocr2": "OCR",
            "deepseek_ocr2_text": "OCR",
            "dots3_note": "vision/audio",
            "dots3_note_text": "vision/audio",
            "ernie4_5_vl_moe": "vision",
            "ernie4_5_vl_moe_text": "vision",
            "glm4v_moe": "vision",
            "glm4v_moe_text": "vision",
            "glm5_next": "vision",
            "hy_v4_vl": "vision",
            "hy_v4_vl_text": "vision",
            "inkling_mm_model": "vision",
            "inkling2": "vision",
            "inkling2_loop": "vision",
            "kimi_k25": "vision",
            "minimax_m3_vl": "vision",
            "minimax_m3_vl_text": "vision",
            "mistral4": "vision",
            "mistral_large4": "vision",
            "mistral_large4_text": "vision",
            "muse_spark": "vision/audio",
            "muse_spark_text": "vision/audio",
            "nemo_speechlm": "speech",
            "nemotron_h_omni": "omni",
            "qwen3_omni_moe": "omni",
            "qwen3_omni_moe_talker_text": "omni",
            "qwen3_omni_moe_text": "omni",
            "qwen3_omni_moe_thinker": "omni",
            "qwen3_vl_moe": "vision",
            "qwen3_vl_moe_text": "vision",
            "step3p5": "vision",
            "step3p7": "vision",
            "unlimited_ocr": "OCR",
            "unlimited_ocr_text": "OCR",
        }.items()
    },
    # not causal language models
    "switch_transformers": "encoder-decoder (T5) model with capacity-limited top-1 routing; not a causal LM",
    "nllb-moe": "encoder-decoder translation model with capacity-limited top-2 routing; not a causal LM",
    "vitpose": "pose-estimation vision model (expert heads per dataset); not a language model",
    "vitpose_backbone": "pose-estimation vision backbone (expert MLPs per dataset); not a language model",
    "openai_privacy_filter": "token classifier (no causal-LM head in transformers' registry); not a generator",
    # standard fused experts, not yet given a family
    "afmoe": _NOT_ADAPTED.format("AfmoeTokenChoiceRouter"),
    "aria_text": _NOT_ADAPTED.format("AriaTextTopKRouter"),
    "axk1": _NOT_ADAPTED.format("AXK1TopkRouter"),
    "axk2": _NOT_ADAPTED.format("AXK2TopkRouter"),
    "beam": _NOT_ADAPTED.format("BeamTopKRouter"),
    "cohere2_moe": _NOT_ADAPTED.format("Cohere2MoeTopKRouter"),
    "deepseek_v32": _NOT_ADAPTED.format("DeepseekV32TopkRouter; its sparse-attention indexer is untested here"),
    "flint": _NOT_ADAPTED.format("FlintTopKRouter"),
    "glm_moe_dsa": _NOT_ADAPTED.format("GlmMoeDsaTopkRouter; its sparse-attention indexer is untested here"),
    "granitemoe_swa": _NOT_ADAPTED.format("GraniteMoeSWATopKRouter, with sliding-window layers"),
    "hy_v3": _NOT_ADAPTED.format("HYV3TopKRouter"),
    "hy_v4": _NOT_ADAPTED.format("HYV4TopkRouter"),
    "kolibri1": _NOT_ADAPTED.format("Kolibri1TopKRouter"),
    "laguna": _NOT_ADAPTED.format("LagunaTopKRouter"),
    "mellum": _NOT_ADAPTED.format("MellumTopKRouter"),
    "mimo_v2_flash": _NOT_ADAPTED.format("MiMoV2FlashTopkRouter"),
    "solar_open": _NOT_ADAPTED.format("SolarOpenTopkRouter"),
    "sarvam_mla": _NOT_ADAPTED.format("DeepseekV3TopkRouter: transformers serves it with DeepseekV3ForCausalLM")
    + "; a candidate for the DeepSeek-V3 family",
    "sarvam_moe": _NOT_ADAPTED.format("Glm4MoeTopkRouter: transformers serves it with Glm4MoeForCausalLM")
    + "; a candidate for the GLM-4.5 family",
}
