"""Tiny random checkpoints of every supported family, written in the standard hub layout.

Each factory returns a config small enough that a test builds it in well under a second, but with
the features that make its family hard: shared experts and their gate (Qwen2-MoE), dense layers among
sparse ones (Qwen3-MoE's `mlp_only_layers`, DeepSeek-V3's `first_k_dense_replace`), Mixtral's tensor
names, DeepSeek-V3's sigmoid router with a selection bias and group-limited routing (and the families that
share it: GLM-4.5, dots.llm1, EXAONE-MoE), DeepSeek-V2's group-limited greedy routing, ERNIE's selection
bias on a child of its router, Hunyuan's router weight in a child Linear, Granite's fused checkpoint names
and scaled embeddings, residuals and logits, PhiMoE's sparsemixer, gpt-oss's transposed experts with biases
and its biased router, MiniMax-M2's selection bias on the block, and the hybrid-attention families
(`hybrid_moe_configs`). Each is saved by `save_pretrained`, which
writes the hub layout the family's releases use (transformers converts on save and load).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DeepseekV2Config,
    DeepseekV3Config,
    Dots1Config,
    Ernie4_5_MoeConfig,
    ExaoneMoeConfig,
    Glm4MoeConfig,
    Glm4MoeLiteConfig,
    GptOssConfig,
    GraniteMoeConfig,
    GraniteMoeSharedConfig,
    HunYuanMoEV1Config,
    LlamaConfig,
    MiniMaxConfig,
    MiniMaxM2Config,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)
from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def moe_configs() -> dict[str, PretrainedConfig]:
    return {
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
        "qwen2_moe": Qwen2MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        "mixtral": MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
        "olmoe": OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        "deepseek_v3": DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
        **_deepseek_like_configs(),
        "deepseek_v2": DeepseekV2Config(
            **{**COMMON, "num_key_value_heads": 4},
            **_MLA,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            routed_scaling_factor=2.0,
        ),
        "ernie4_5_moe": Ernie4_5_MoeConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
        ),
        "hunyuan_v1_moe": HunYuanMoEV1Config(**COMMON, head_dim=8, intermediate_size=16, num_experts=8, moe_topk=2),
        "granitemoe": GraniteMoeConfig(**COMMON, intermediate_size=16, num_local_experts=8, **_GRANITE),
        "granitemoeshared": GraniteMoeSharedConfig(
            **COMMON, intermediate_size=16, num_local_experts=8, shared_intermediate_size=24, **_GRANITE
        ),
        "phimoe": PhimoeConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
        "gpt_oss": GptOssConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,
            # gpt-oss's YaRN, its context scaled down with the tiny model's
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 2,
            },
        ),
        "minimax_m2": MiniMaxM2Config(
            **COMMON, head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2
        ),
        **hybrid_moe_configs(),
    }


HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
"""Linear attention first, as in the releases (Qwen3-Next: three linear layers per full one; MiniMax-Text-01:
seven lightning layers per softmax one), so that no cache length can be read off layer 0."""

LINEAR_HEADS = dict(
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)


def hybrid_moe_configs() -> dict[str, PretrainedConfig]:
    """MoE families whose decoder mixes linear-attention layers (a recurrent state per sequence, no keys or
    values) with full attention: Qwen3-Next and Qwen3.5 (gated DeltaNet, shared expert with its gate; Qwen3-Next
    with a dense last layer), MiniMax-Text-01 (lightning attention, blocks of 4 so prompts span several)."""
    hybrid = {**COMMON, "num_hidden_layers": 3}  # every layer sparse: linear, full, linear attention
    return {
        "qwen3_next": Qwen3NextConfig(
            **{**hybrid, "num_hidden_layers": 4},
            **LINEAR_HEADS,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[3],
            layer_types=HYBRID_LAYERS,
        ),
        "qwen3_5_moe": Qwen3_5MoeConfig(  # the multimodal release: a text model beside a vision tower
            text_config=dict(
                **hybrid,
                **LINEAR_HEADS,
                head_dim=8,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=8,
                num_experts_per_tok=2,
                layer_types=HYBRID_LAYERS[:3],
            ),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
            tie_word_embeddings=False,
        ),
        "qwen3_5_moe_text": Qwen3_5MoeTextConfig(  # the text model alone, as an export of the release writes it
            **hybrid,
            **LINEAR_HEADS,
            head_dim=8,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            layer_types=HYBRID_LAYERS[:3],
        ),
        "minimax": MiniMaxConfig(
            **hybrid,
            head_dim=8,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            block_size=4,
            layer_types=HYBRID_LAYERS[:3],
        ),
    }


#: multi-head latent attention, as small as it goes
_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
#: Granite's scaled embeddings, residual branches and logits
_GRANITE = dict(num_experts_per_tok=2, embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=2.0)


def _deepseek_like_configs() -> dict[str, PretrainedConfig]:
    """The families with DeepSeek-V3's router: sigmoid, selection bias, two groups of four experts."""
    router = dict(num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    moe = dict(**COMMON, intermediate_size=48, moe_intermediate_size=16, **router)
    return {
        "glm4_moe": Glm4MoeConfig(**moe, head_dim=8, n_routed_experts=8, first_k_dense_replace=1, n_shared_experts=1),
        "glm4_moe_lite": Glm4MoeLiteConfig(
            **{**moe, "num_key_value_heads": 4},
            **_MLA,
            n_routed_experts=8,
            n_shared_experts=1,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
        "dots1": Dots1Config(**moe, head_dim=8, n_routed_experts=8, first_k_dense_replace=1, n_shared_experts=1),
        "exaone_moe": ExaoneMoeConfig(**moe, head_dim=8, num_experts=8, first_k_dense_replace=1, num_shared_experts=1),
    }


def dense_configs() -> dict[str, PretrainedConfig]:
    return {
        "llama": LlamaConfig(**COMMON, intermediate_size=64, mlp_bias=True),
        "qwen2": Qwen2Config(**COMMON, intermediate_size=64),
        "qwen3": Qwen3Config(**COMMON, head_dim=8, intermediate_size=64),
        "mistral": MistralConfig(**COMMON, intermediate_size=64),
    }


#: module names of router weights (and gpt-oss's router bias): scaled up in `save_random_model`
ROUTER_WEIGHTS = ("mlp.gate.weight", "mlp.gate.wg.weight", "mlp.router.weight", "router.bias", "moe.router.weight")


def save_random_model(config: PretrainedConfig, directory: Path, seed: int = 0) -> Path:
    """A randomly initialised model of `config`, saved with `save_pretrained` (safetensors).

    Router weights are scaled up so that routing depends strongly on the input (a near-uniform router
    would make a wrong expert order invisible), and the selection biases are made non-zero. A config with a
    text config inside (Qwen3.5's multimodal release) is saved as the whole multimodal model.
    """
    torch.manual_seed(seed)
    if config.get_text_config() is config:
        model = AutoModelForCausalLM.from_config(config).eval()
    else:  # a multimodal release (Qwen3.5): the whole model, its text model nested as the hub has it
        model = AutoModelForImageTextToText.from_config(config).eval()
    computed = {name for name, _ in model.named_buffers() if not name.endswith("e_score_correction_bias")}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            # buffers computed from the config (rotary frequencies, lightning attention's decays) stay as computed
            if tensor.is_floating_point() and name not in computed:
                tensor.normal_(0.0, 0.5 if name.endswith(ROUTER_WEIGHTS) else 0.08)
            if name.endswith("e_score_correction_bias"):
                tensor.uniform_(-0.05, 0.05)
            if name.endswith("norm.weight") or "layernorm" in name:
                tensor.fill_(1.0)
    model.save_pretrained(directory)
    return directory


FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def _not_converted(name: str) -> bool:
    """Tensors a block-FP8 release keeps in their precision: embeddings, norms, routers and their biases, lm_head."""
    return (
        not name.endswith(".weight")
        or "embed_tokens" in name
        or name.startswith("lm_head")
        or "norm" in name
        or name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))
    )


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype):
    """DeepSeek's block quantization: one scale per block, its amax / 448 (in the scale's stored dtype), and
    e4m3 values weight / scale."""
    rows, cols = weight.shape
    b0, b1 = block
    grid = (-(-rows // b0), -(-cols // b1))
    scale = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            amax = weight[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].abs().max().float()
            scale[i, j] = amax.clamp(min=1e-12) / FP8_MAX
    scale = scale.to(scale_dtype)
    expanded = scale.float().repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return (weight.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def save_block_fp8(
    source_dir: Path,
    out_dir: Path,
    block: tuple[int, int] = (128, 128),
    scale_dtype: torch.dtype = torch.float32,
) -> Path:
    """The checkpoint of `source_dir` in the layout of the block-FP8 releases (DeepSeek-V3, Qwen3-*-FP8): every
    linear weight F8_E4M3 with its `weight_scale_inv` [ceil(rows/b0), ceil(cols/b1)], embeddings, norms, routers
    and lm_head in their precision and named in `modules_to_not_convert`, `quantization_config` in config.json."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for file in sorted(source_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                tensor = handle.get_tensor(name)
                if _not_converted(name) or tensor.dim() != 2:
                    tensors[name] = tensor
                    skipped.append(name.removesuffix(".weight"))
                    continue
                tensors[name], tensors[f"{name}_scale_inv"] = quantize_fp8_block(tensor, block, scale_dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for file in source_dir.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy2(file, out_dir / file.name)
    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": sorted(set(skipped)),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


#: the e2m1 grid, by nibble: bit 3 the sign, bits 2-0 the magnitude's index (the OCP MX spec's table)
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MXFP4_GROUP = 32
#: what openai/gpt-oss-20b's quantization_config keeps in bf16
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MXFP4 rule on [..., R, C] (C a multiple of 32): per 32 values of a row one e8m0 power of two, 2 ** (e - 2)
    with e = floor(log2(amax)) (the largest e2m1 value, 6, has exponent 2), and each value / scale rounded to the
    nearest e2m1 value; packed two nibbles a byte, low nibble first: blocks uint8 [..., R, C/32, 16] and scales
    uint8 [..., R, C/32] (the exponent + 127)."""
    *lead, rows, cols = weight.shape
    if cols % MXFP4_GROUP:
        raise ValueError(f"mxfp4 groups {MXFP4_GROUP} values of a row; a row of {cols} values does not divide")
    groups = weight.float().reshape(*lead, rows, cols // MXFP4_GROUP, MXFP4_GROUP)
    amax = groups.abs().amax(-1).clamp(min=2.0**-120)
    exponent = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    grid = torch.tensor(E2M1_MAGNITUDES)
    magnitude = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1)
    nibbles = (magnitude | ((scaled < 0) & (magnitude > 0)).long() << 3).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def save_mxfp4_gpt_oss(source_dir: Path, out_dir: Path) -> Path:
    """The gpt-oss checkpoint of `source_dir` (a `save_random_model` of a `GptOssConfig` whose hidden and
    intermediate sizes are multiples of 32) in the layout of openai/gpt-oss-20b: each layer's
    `mlp.experts.gate_up_proj` and `down_proj` as MXFP4 `*_blocks` and `*_scales` in the checkpoint's
    [E, out, in] orientation (the module holds them [E, in, out]), everything else (expert biases, attention,
    router, embeddings, norms, lm_head) bf16, and the release's `quantization_config`."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                tensor = handle.get_tensor(name)
                if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                    stored = tensor.transpose(-1, -2)  # the module's [E, in, out] as the release's [E, out, in]
                    tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(stored)
                else:
                    tensors[name] = tensor.to(torch.bfloat16)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for file in source_dir.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy2(file, out_dir / file.name)
    config = json.loads((source_dir / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_NOT_CONVERTED}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
