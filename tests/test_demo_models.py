"""The committed demo models load offline with plain transformers and do their tasks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from demo.evaluate import EVAL_SEED, greedy_answers, task_accuracy
from demo.specialisation import routing_mass, top_half_share
from demo.tasks import TASK_NAMES, TASKS, generate

from conftest import DEMO_DENSE, DEMO_MOE, DEMO_MOE_FINE

MAX_BYTES = 25 * 1024 * 1024
MODELS = {"moe": DEMO_MOE, "moe-fine": DEMO_MOE_FINE, "dense": DEMO_DENSE}


@pytest.mark.parametrize("directory", MODELS.values(), ids=MODELS.keys())
def test_standard_layout_and_size(directory) -> None:
    weights = sorted(directory.glob("*.safetensors"))
    assert weights, "safetensors weights"
    assert sum(p.stat().st_size for p in weights) <= MAX_BYTES
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "training.json"):
        assert (directory / name).is_file(), name
    card = (directory / "README.md").read_text()
    assert "Held-out accuracy" in card and "scripts/train_demo_models.py" in card


def test_moe_architecture() -> None:
    config = AutoConfig.from_pretrained(DEMO_MOE)
    assert config.model_type == "qwen3_moe"
    assert config.num_hidden_layers >= 4 and config.num_experts >= 16 and config.num_experts_per_tok >= 2
    assert config.router_aux_loss_coef > 0


def test_fine_grained_moe_architecture() -> None:
    """The shape users prune: few of many narrow experts per token, and a shared expert."""
    config = AutoConfig.from_pretrained(DEMO_MOE_FINE)
    assert config.model_type == "qwen2_moe"
    assert config.num_experts >= 64 and 4 <= config.num_experts_per_tok <= 8
    assert config.shared_expert_intermediate_size > 0 and config.router_aux_loss_coef > 0


def test_dense_architecture() -> None:
    """No slack: an MLP at most 3x the hidden width, so that pruning half of it costs accuracy."""
    config = AutoConfig.from_pretrained(DEMO_DENSE)
    assert config.model_type in {"qwen3", "llama"}
    assert config.intermediate_size <= 3 * config.hidden_size


def test_batched_greedy_equals_one_by_one(demo_moe) -> None:
    """Left padding in a batch must not change any answer."""
    model, tokenizer = demo_moe
    prompts = [e.prompt for e in generate(2, seed=5)]
    batched = greedy_answers(model, tokenizer, prompts, batch_size=len(prompts))
    single = [greedy_answers(model, tokenizer, [p])[0] for p in prompts]
    assert batched == single


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["demo_moe", "demo_moe_fine", "demo_dense"])
def test_accuracy_on_every_task(fixture, request) -> None:
    model, tokenizer = request.getfixturevalue(fixture)
    accuracy = task_accuracy(model, tokenizer, list(generate(50, EVAL_SEED + 1)))
    assert set(accuracy) == set(TASK_NAMES)
    low = {task: acc for task, acc in accuracy.items() if acc < 0.85}
    assert not low, f"tasks below 85%: {low}"


@pytest.mark.parametrize("fixture", ["demo_moe", "demo_moe_fine", "demo_dense"])
def test_committed_weights_do_their_tasks(fixture, request) -> None:
    """The committed checkpoints themselves, on a small fresh sample (the model card's table is a claim;
    this checks the weights). 12 examples per task keep it quick; the slow test below judges 50 per task."""
    model, tokenizer = request.getfixturevalue(fixture)
    accuracy = task_accuracy(model, tokenizer, list(generate(12, EVAL_SEED + 2)))
    assert min(accuracy.values()) >= 0.75, accuracy
    assert sum(accuracy.values()) / len(accuracy) >= 0.9, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["demo_moe", "demo_moe_fine"])
def test_moe_routing_is_task_specialised(fixture, request) -> None:
    model, tokenizer = request.getfixturevalue(fixture)
    shares = torch.stack([top_half_share(routing_mass(model, tokenizer, t.examples(50, EVAL_SEED))) for t in TASKS])
    assert (shares > 0.5).float().mean() >= 0.75, shares
    assert shares.mean() > 0.6, shares
