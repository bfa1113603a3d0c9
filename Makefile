# taskmoe: two commands do all the set-up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU installs pin the CPU build of torch (it lies on local disk); a plain `torch` pulls CUDA.
TORCH_CPU := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

MODEL ?= models/demo-moe

.PHONY: install serve test test-fast lint train-models eval clean

$(BIN)/taskmoe: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	touch $@

install: $(BIN)/taskmoe

## The main job: the OpenAI-compatible server on 127.0.0.1:8000 with the demo MoE and its patterns.
serve: install
	$(BIN)/taskmoe serve --model $(MODEL)

## The whole suite (what CI runs).
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## The quick subset for your own loop: everything but the tests marked slow.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" -x -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Retrain the demo models (one process and one CPU thread each); a developer runs this, never CI.
train-models: install
	$(BIN)/python scripts/train_demo_models.py --which moe --threads 1 & \
	$(BIN)/python scripts/train_demo_models.py --which moe-fine --threads 1 & \
	$(BIN)/python scripts/train_demo_models.py --which dense --threads 1 & \
	wait

## Per-task held-out accuracy of a model directory: make eval MODEL=models/demo-dense
eval: install
	$(BIN)/taskmoe eval $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
