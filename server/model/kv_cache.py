"""The KV cache handed to a causal LM's forward pass: the one its family needs, under the name the installed
transformers expects.

Most families take `DynamicCache(config=...)`, which gives linear-attention layers (Qwen3-Next's gated DeltaNet)
a conv and recurrent state each and full-attention layers keys and values. MiniMax's forward insists on its own
`MiniMaxCache`, which as transformers builds it lazily makes every layer a key/value layer: when layer 0 is
lightning attention (as in MiniMax-Text-01), the cache's length, read off layer 0, stays 0, and a decode step
without explicit positions gets position 0 and a one-column mask. `LightningCache` names each layer's kind up
front, so that the length and the mask are read off the first full-attention layer.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``; the old name warns and
is removed in 5.40. Earlier releases (the GPU image ships 5.17) know only the old name, and their
``**kwargs`` would swallow ``cache`` without a word and decode with no cache at all. So the name is read
off the model class's own signature, once per class.
"""

from __future__ import annotations

import inspect
from functools import cache as memoize

import torch
from transformers import Cache, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer
from transformers.models.minimax.modeling_minimax import MiniMaxCache

NEW_NAME, OLD_NAME = "cache", "past_key_values"


@memoize
def cache_keyword(model_class: type[torch.nn.Module]) -> str:
    """``cache`` when the class's forward takes it by that name, else ``past_key_values``."""
    parameters = inspect.signature(model_class.forward).parameters
    if NEW_NAME in parameters:
        return NEW_NAME
    if OLD_NAME in parameters:
        return OLD_NAME
    raise TypeError(f"{model_class.__name__}.forward takes neither {NEW_NAME!r} nor {OLD_NAME!r}")


def cache_argument(model: torch.nn.Module, cache: Cache) -> dict[str, Cache]:
    """The keyword argument that passes `cache` to `model`'s forward: ``model(**inputs, **this)``."""
    return {cache_keyword(type(model)): cache}


class LightningCache(MiniMaxCache):
    """MiniMax's cache with one layer per decoder layer from the start: a placeholder that holds no length for
    lightning (linear) attention, whose state lives in `linear_cache`, and a key/value layer for softmax
    attention."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        kinds = list(config.layer_types)
        self.layers = [LinearAttentionLayer() if kind == "linear_attention" else DynamicLayer() for kind in kinds]
        self.linear_cache = [None] * len(kinds)  # None until the layer's first forward: `get_linear_cache` says so


_FAMILY_CACHES = {"minimax": LightningCache}


def new_cache(config: PretrainedConfig) -> Cache:
    """An empty cache for a model of `config`, of the class its forward takes."""
    factory = _FAMILY_CACHES.get(config.model_type)
    return factory(config) if factory is not None else DynamicCache(config=config)
