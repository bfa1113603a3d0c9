"""Train the demo models from scratch on the synthetic demo tasks, on CPU, with a fixed seed.

    python scripts/train_demo_models.py                     # every demo model, into models/
    python scripts/train_demo_models.py --which moe-fine    # only models/demo-moe-fine

The models: `demo-moe` (Qwen3-MoE, 16 routed experts, top-2), `demo-moe-fine` (Qwen2-MoE, 64 fine-grained
routed experts, top-4, and a shared expert: the shape of the MoE models users prune, such as DeepSeek-V3 or
Qwen3-30B-A3B) and `demo-dense` (Qwen3 with MLPs 3x the hidden width, so that channel pruning has no slack).

Writes, per model, the safetensors checkpoint, the character tokenizer with its chat template,
`training.json` (settings, time, held-out accuracy, routing specialisation) and a model card.
Run by a developer when the models change; never in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from demo.evaluate import EVAL_SEED, chat_prompt_ids, task_accuracy
from demo.model_card import write_model_card
from demo.specialisation import routing_mass, top_half_share
from demo.tasks import TASKS, Example, generate
from demo.tokenizer import build_char_tokenizer

IGNORE = -100


def _backbone(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What every demo model shares: 4 layers of width 128, 4 heads (2 key/value), the character vocabulary."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }


def _sparse(aux_loss_coef: float) -> dict[str, Any]:
    """Every layer sparse, normalised top-k weights, the router's load-balancing loss."""
    return {
        "intermediate_size": 512,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": aux_loss_coef,
    }


def moe_config(tokenizer: PreTrainedTokenizerBase, aux_loss_coef: float = 0.01) -> Qwen3MoeConfig:
    """4 sparse layers of 16 routed experts, top-2 routing, with the router's load-balancing loss."""
    return Qwen3MoeConfig(
        **_backbone(tokenizer),
        **_sparse(aux_loss_coef),
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=2,
    )


def fine_moe_config(tokenizer: PreTrainedTokenizerBase, aux_loss_coef: float = 0.01) -> Qwen2MoeConfig:
    """4 sparse layers of 64 narrow routed experts, top-4 routing, and a shared expert of two experts' width:
    few of many experts per token, as in DeepSeek-V3 (8 of 256 and a shared one) or Qwen3-30B-A3B (8 of 128)."""
    return Qwen2MoeConfig(
        **_backbone(tokenizer),
        **_sparse(aux_loss_coef),
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=64,
        num_experts_per_tok=4,
    )


def dense_config(tokenizer: PreTrainedTokenizerBase, intermediate_size: int = 384) -> Qwen3Config:
    """4 layers with MLPs 3x the hidden width: wide enough for the tasks, narrow enough that pruning half the
    channels costs accuracy unless the right ones are kept (an 8x MLP kept 98% under magnitude pruning)."""
    return Qwen3Config(**_backbone(tokenizer), intermediate_size=intermediate_size)


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """Input ids of the whole chat, and labels that score only the answer and its end token."""
    prompt = chat_prompt_ids(tokenizer, example.prompt)
    answer = [*tokenizer.encode(example.answer, add_special_tokens=False), tokenizer.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def training_stream(task_index: int, seed: int, held_out: set[str]) -> Iterator[Example]:
    """Endless examples of one task, skipping the held-out evaluation prompts."""
    task = TASKS[task_index]
    rng = random.Random(f"train:{task.name}:{seed}")
    while True:
        example = task.make(rng)
        if example.prompt not in held_out:
            yield example


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 100,
    weight_decay: float = 0.01,
) -> float:
    """AdamW with warm-up and cosine decay; tasks are drawn in proportion to their current loss,
    so that training time goes to the tasks that are not learnt yet. Returns wall seconds."""
    held_out = {e.prompt for e in generate(200, EVAL_SEED)}
    streams = [training_stream(i, seed, held_out) for i in range(len(TASKS))]
    task_loss = torch.ones(len(TASKS))
    sampler = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    is_moe = hasattr(model.config, "num_experts")
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        weights = (task_loss + 0.02).clamp(min=0.05)
        picks = torch.multinomial(weights, batch_size, replacement=True, generator=sampler).tolist()
        examples = [next(streams[i]) for i in picks]
        batch = collate([encode(tokenizer, e) for e in examples], tokenizer.pad_token_id)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_router_logits=is_moe,
        )
        logits = out.logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(targets.shape)
        counted = (targets != IGNORE).sum(1).clamp(min=1)
        example_loss = token_loss.sum(1) / counted
        loss = example_loss.mean()
        if is_moe:
            loss = loss + aux_coef * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            pick_tensor = torch.tensor(picks)
            for i in range(len(TASKS)):
                chosen = pick_tensor == i
                if chosen.any():
                    task_loss[i] = 0.9 * task_loss[i] + 0.1 * example_loss.detach()[chosen].mean()
        if step % log_every == 0 or step == steps:
            per_task = " ".join(f"{t.name}={task_loss[i]:.3f}" for i, t in enumerate(TASKS))
            elapsed = time.perf_counter() - started
            print(f"step {step}/{steps} loss {loss.item():.4f} [{per_task}] {elapsed:.0f}s", flush=True)
    model.eval()
    return time.perf_counter() - started


def specialisation_table(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int) -> dict[str, list[float]]:
    """Per task, the top-half routing share of every MoE layer on held-out examples."""
    table = {}
    for task in TASKS:
        shares = top_half_share(routing_mass(model, tokenizer, task.examples(n, EVAL_SEED)))
        table[task.name] = [round(float(s), 4) for s in shares]
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=["moe", "moe-fine", "dense", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--moe-steps", type=int, default=3500)
    parser.add_argument("--moe-fine-steps", type=int, default=2800)
    parser.add_argument("--dense-steps", type=int, default=3500)
    parser.add_argument("--dense-width", type=int, default=384, help="demo-dense's MLP width (default 3x hidden)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW weight decay (default 0.1 for demo-moe-fine, whose translations of one word generalise only "
        "with it; 0.01 for the others)",
    )
    parser.add_argument(
        "--aux-loss-coef", type=float, default=0.01, help="demo-moe's router load-balancing loss coefficient"
    )
    parser.add_argument("--eval-n", type=int, default=200, help="held-out examples per task")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    command = "python scripts/train_demo_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tokenizer = build_char_tokenizer()
    kinds = ["moe", "moe-fine", "dense"] if args.which == "all" else [args.which]
    for kind in kinds:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        if kind == "moe":
            model: PreTrainedModel = Qwen3MoeForCausalLM(moe_config(tokenizer, args.aux_loss_coef))
            steps = args.moe_steps
        elif kind == "moe-fine":
            model = Qwen2MoeForCausalLM(fine_moe_config(tokenizer, args.aux_loss_coef))
            steps = args.moe_fine_steps
        else:
            model = Qwen3ForCausalLM(dense_config(tokenizer, args.dense_width))
            steps = args.dense_steps
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training demo-{kind}: {n_params / 1e6:.2f}M parameters, {steps} steps", flush=True)
        weight_decay = args.weight_decay if args.weight_decay is not None else (0.1 if kind == "moe-fine" else 0.01)
        cpu_started = time.process_time()
        seconds = train(model, tokenizer, steps, args.batch_size, args.lr, args.seed, weight_decay=weight_decay)
        cpu_seconds = time.process_time() - cpu_started
        accuracy = task_accuracy(model, tokenizer, list(generate(args.eval_n, EVAL_SEED)))
        print(f"demo-{kind} held-out accuracy: {json.dumps(accuracy)}", flush=True)
        report: dict[str, object] = {
            "kind": kind,
            "parameters": n_params,
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": weight_decay,
            "seed": args.seed,
            "train_seconds": round(seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "command": command.strip(),
            "eval_examples_per_task": args.eval_n,
            "accuracy": accuracy,
        }
        if kind.startswith("moe"):
            report["specialisation"] = specialisation_table(model, tokenizer, args.eval_n)
            print(f"demo-{kind} top-half routing share: {json.dumps(report['specialisation'])}", flush=True)
        directory = args.out / f"demo-{kind}"
        directory.mkdir(parents=True, exist_ok=True)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        (directory / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        write_model_card(directory, model.config, report)
        print(f"wrote {directory}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
