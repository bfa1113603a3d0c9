"""The KV cache handed to a causal LM's forward pass, under the name the installed transformers expects.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``; the old name warns and
is removed in 5.40. Earlier releases (the GPU image ships 5.17) know only the old name, and their
``**kwargs`` would swallow ``cache`` without a word and decode with no cache at all. So the name is read
off the model class's own signature, once per class.
"""

from __future__ import annotations

import inspect
from functools import cache as memoize

import torch
from transformers import Cache

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
