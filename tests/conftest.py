"""Shared fixtures: the demo models committed under models/, loaded offline once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_MOE = ROOT / "models" / "demo-moe"
DEMO_MOE_FINE = ROOT / "models" / "demo-moe-fine"
DEMO_DENSE = ROOT / "models" / "demo-dense"


def pytest_configure(config: pytest.Config) -> None:
    """The suite's warning filters (pyproject's filterwarnings) hold in the Python processes it starts too
    (the CLI, scripts, a served `taskmoe serve`), through PYTHONWARNINGS: there a filter's message is a
    literal prefix, not a regular expression, and no filter may contain a comma."""
    filters = config.getini("filterwarnings")
    assert not any("," in entry for entry in filters), filters
    os.environ["PYTHONWARNINGS"] = ",".join(filters)


def load_demo(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def demo_moe():
    """(model, tokenizer) of models/demo-moe."""
    return load_demo(DEMO_MOE)


@pytest.fixture(scope="session")
def demo_moe_fine():
    """(model, tokenizer) of models/demo-moe-fine."""
    return load_demo(DEMO_MOE_FINE)


@pytest.fixture(scope="session")
def demo_dense():
    """(model, tokenizer) of models/demo-dense."""
    return load_demo(DEMO_DENSE)
