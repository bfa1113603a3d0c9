"""Filling a transformers model that was built on the meta device, one tensor at a time.

A model built on the meta device costs no memory: every parameter and buffer is a shape without storage.
The builders (`variant`, `pooled`) and the layer stream (`layer_stream`) give it real tensors, name by name,
and the layer stream puts them back on the meta device when a layer is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model of `config` on the meta device: its module tree, without memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name`, whatever its old shape."""
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attribute in owner._parameters:
        owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    elif attribute in owner._buffers:
        owner._buffers[attribute] = tensor
    else:
        raise KeyError(name)


def computed_buffer_names(model: nn.Module, stored: Callable[[str], bool] | None = None) -> set[str]:
    """Buffers computed at load rather than read: the non-persistent ones (rotary frequencies and the like)
    and, given `stored` (does the checkpoint hold this tensor?), persistent ones that a checkpoint leaves out
    (MiniMax's lightning-attention decays), which the module's own init computes from the config, as
    transformers' loader does."""
    names = {name for name, _ in model.named_non_persistent_buffers()}
    if stored is not None:
        names |= {name for name, _ in model.named_buffers() if name not in names and not stored(name)}
    return names


def compute_buffers(model: PreTrainedModel, names: Iterable[str], device: torch.device) -> None:
    """Give the computed buffers `names` real memory on `device`, and let transformers' own init of their
    modules compute them."""
    owners = set()
    for name in names:
        set_tensor(model, name, torch.empty_like(model.get_buffer(name), device=device))
        owners.add(name.rpartition(".")[0])
    for owner in owners:
        model._init_weights(model.get_submodule(owner))


def to_meta(module: nn.Module) -> None:
    """Put every tensor of `module` back on the meta device, freeing its memory."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        set_tensor(module, name, torch.empty_like(tensor, device="meta"))
