"""Tiny random checkpoints of every supported family, written in the standard hub layout.

Each factory returns a config small enough that a test builds it in well under a second, but with
the features that make its family hard: shared experts and their gate (Qwen2-MoE), dense layers among
sparse ones (Qwen3-MoE's `mlp_only_layers`, DeepSeek-V3's `first_k_dense_replace`), Mixtral's tensor
names, DeepSeek-V3's sigmoid router with a selection bias and group-limited routing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

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
    }


def dense_configs() -> dict[str, PretrainedConfig]:
    return {
        "llama": LlamaConfig(**COMMON, intermediate_size=64, mlp_bias=True),
        "qwen2": Qwen2Config(**COMMON, intermediate_size=64),
        "qwen3": Qwen3Config(**COMMON, head_dim=8, intermediate_size=64),
        "mistral": MistralConfig(**COMMON, intermediate_size=64),
    }


def save_random_model(config: PretrainedConfig, directory: Path, seed: int = 0) -> Path:
    """A randomly initialised model of `config`, saved with `save_pretrained` (safetensors).

    Router weights are scaled up so that routing depends strongly on the input (a near-uniform router
    would make a wrong expert order invisible), and DeepSeek's selection bias is made non-zero.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("inv_freq"):
                tensor.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.08)
            if name.endswith("e_score_correction_bias"):
                tensor.uniform_(-0.05, 0.05)
            if name.endswith("norm.weight") or "layernorm" in name:
                tensor.fill_(1.0)
    model.save_pretrained(directory)
    return directory
