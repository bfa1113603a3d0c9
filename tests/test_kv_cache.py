"""The KV cache goes to the forward pass under the name the model class takes: `cache` on transformers 5.24
and later, `past_key_values` on earlier releases (the GPU image's 5.17), never a name that `**kwargs`
would swallow; and it is the cache class that the model's family needs."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from server.model.kv_cache import LightningCache, cache_argument, cache_keyword, new_cache

from tiny_models import HYBRID_LAYERS, hybrid_moe_configs, moe_configs


class _OldStyle(torch.nn.Module):  # a causal LM's forward as transformers 5.17 writes it
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return past_key_values


class _NewStyle(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return cache


class _Neither(torch.nn.Module):
    def forward(self, input_ids=None, **kwargs):
        return kwargs


def test_the_name_follows_the_forward_signature() -> None:
    assert cache_keyword(_OldStyle) == "past_key_values"
    assert cache_keyword(_NewStyle) == "cache"
    for model in (_OldStyle(), _NewStyle()):
        cache = DynamicCache()
        assert model(input_ids=None, **cache_argument(model, cache)) is cache


def test_a_forward_without_either_name_is_refused() -> None:
    with pytest.raises(TypeError, match="neither"):
        cache_keyword(_Neither)


@pytest.mark.parametrize("model_class", [Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, LlamaForCausalLM])
def test_installed_transformers_takes_what_it_asks_for(model_class) -> None:
    """The lock's transformers renamed the argument; the name chosen must be the one its deprecation asks
    for (the suite makes its `past_key_values` warning an error)."""
    import transformers
    from packaging.version import Version

    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert cache_keyword(model_class) == expected


def test_each_family_gets_the_cache_its_forward_takes() -> None:
    """Linear-attention layers get a conv/recurrent state layer in a `DynamicCache`; MiniMax, whose forward
    refuses any cache but its own, a `MiniMaxCache` whose lightning layers hold no length."""
    configs = hybrid_moe_configs()
    expected = [LinearAttentionLayer if kind == "linear_attention" else DynamicLayer for kind in HYBRID_LAYERS]
    for config in (configs["qwen3_next"], configs["qwen3_5_moe"].get_text_config(), configs["minimax"]):
        cache = new_cache(config)
        assert [type(layer) for layer in cache.layers] == expected[: config.num_hidden_layers]
    assert isinstance(new_cache(configs["minimax"]), LightningCache)
    assert isinstance(new_cache(configs["minimax"]), MiniMaxCache)
    plain = new_cache(moe_configs()["qwen3_moe"])
    assert type(plain) is DynamicCache and all(type(layer) is DynamicLayer for layer in plain.layers)
