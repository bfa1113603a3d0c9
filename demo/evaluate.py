"""Greedy exact-match accuracy of a causal LM on the demo tasks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo.tasks import Example, get_task
from server.model_info import template_ids

EVAL_SEED = 20_251_123
"""Seed of the held-out examples; the training script never trains on these prompts."""


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a one-turn chat with the assistant's turn opened, as the server makes them."""
    return template_ids(tokenizer, [{"role": "user", "content": prompt}])


@torch.inference_mode()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding, cut at the end-of-turn token."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [chat_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in output[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 64,
) -> dict[str, float]:
    """Share of exactly right greedy answers, per task, in the order the tasks first appear."""
    answers = greedy_answers(model, tokenizer, [e.prompt for e in examples], batch_size=batch_size)
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for example, answer in zip(examples, answers, strict=True):
        total[example.task] += 1
        right[example.task] += get_task(example.task).score(example, answer)
    return {task: right[task] / total[task] for task in total}
