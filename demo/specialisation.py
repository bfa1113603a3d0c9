"""How task-specialised a Qwen3-MoE's routing is: the demo MoE exists to show that.

For each task and MoE layer, the routing mass of expert i is the sum over the task's tokens of the
gating weight it receives when the router selects it (TCESS with r = 0, before averaging). The
specialisation is the share of that mass taken by the task's top half of experts: 50% for a router
that spreads a task evenly, 100% for one that sends it to half of the experts only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo.evaluate import chat_prompt_ids
from demo.tasks import Example


@torch.inference_mode()
def routing_mass(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 64,
) -> torch.Tensor:
    """Selected gating mass per (MoE layer, expert) over the full chats (prompt and answer) of `examples`."""
    config = model.config
    mass: torch.Tensor | None = None
    for start in range(0, len(examples), batch_size):
        chats = [
            chat_prompt_ids(tokenizer, e.prompt) + tokenizer.encode(e.answer) + [tokenizer.eos_token_id]
            for e in examples[start : start + batch_size]
        ]
        width = max(len(c) for c in chats)
        input_ids = torch.full((len(chats), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(chats):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        real = attention_mask.reshape(-1).bool()
        per_layer = []
        for logits in out.router_logits:
            probs = torch.softmax(logits[real].float(), dim=-1)
            top_values, top_index = probs.topk(config.num_experts_per_tok, dim=-1)
            if getattr(config, "norm_topk_prob", False):
                top_values = top_values / top_values.sum(-1, keepdim=True)
            layer_mass = torch.zeros(probs.shape[-1]).index_add_(0, top_index.reshape(-1), top_values.reshape(-1))
            per_layer.append(layer_mass)
        batch_mass = torch.stack(per_layer)
        mass = batch_mass if mass is None else mass + batch_mass
    assert mass is not None, "no examples"
    return mass


def top_half_share(mass: torch.Tensor) -> torch.Tensor:
    """Per layer, the share of routing mass that the top half of experts receives."""
    n_experts = mass.shape[-1]
    top = mass.sort(dim=-1, descending=True).values[..., : n_experts // 2]
    return top.sum(-1) / mass.sum(-1)
