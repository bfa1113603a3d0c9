# taskmoe: two commands do all the set-up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installs take the exact versions of the lock (`make lock` refreshes it). Its torch is the CPU build,
# which pip finds among its local wheels where it lies on disk (this workplace), else on PyTorch's index.
LOCK := requirements/cpu.txt
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# pip's extra index for the torch pinned in file $(1): none where pip finds that wheel locally
torch_index = $$($(BIN)/python -m pip install -q --dry-run --no-index --no-deps "$$(grep -m1 '^torch==' $(1))" \
	>/dev/null 2>&1 || echo --extra-index-url $(TORCH_CPU_INDEX))
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

MODEL ?= models/demo-moe

.PHONY: install serve test test-fast lint lock train-models eval gpu-check clean

# pip first (the lock's own), then the lock, then pip-sync removes what an older lock installed, then the
# package itself without dependencies (built by the lock's setuptools, whose notice about editable installs
# is information, not a warning); check_lock fails the install if anything differs from the lock.
$(BIN)/taskmoe: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep -m1 '^pip==' $(LOCK))"
	index="$(call torch_index,$(LOCK))"; \
	  $(BIN)/python -m pip install --quiet $$index -r $(LOCK) && $(BIN)/pip-sync --quiet --pip-args "$$index" $(LOCK)
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python scripts/check_lock.py $(LOCK)
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

## Refresh the locks from pyproject.toml and requirements/*.in after changing a dependency there: every
## other pin stays. `make lock UPGRADE=1` takes the newest releases of everything instead. Then run
## `make test` and commit the locks with the change. The CUDA lock resolves as the image does (PyPI alone,
## no local wheels or pip configuration), the packages it shares with the CPU lock held to their versions.
LOCK_FLAGS := --quiet $(if $(UPGRADE),--upgrade) --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	--extra dev --extra plots --extra ray
lock: install
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) \
	  $(call torch_index,requirements/cpu.in) \
	  --output-file $(LOCK) pyproject.toml requirements/cpu.in
	grep -v '^torch==' $(LOCK) > $(VENV)/cpu-constraints.txt
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile \
	  $(LOCK_FLAGS) -c $(VENV)/cpu-constraints.txt --output-file requirements/cuda.txt pyproject.toml requirements/cuda.in
	$(MAKE) install

## Retrain the demo models (one process and one CPU thread each); a developer runs this, never CI.
train-models: install
	$(BIN)/python scripts/train_demo_models.py --which moe --threads 1 & \
	$(BIN)/python scripts/train_demo_models.py --which moe-fine --threads 1 & \
	$(BIN)/python scripts/train_demo_models.py --which dense --threads 1 & \
	wait

## Per-task held-out accuracy of a model directory: make eval MODEL=models/demo-dense
eval: install
	$(BIN)/taskmoe eval $(MODEL)

## The prepared GPU check on a machine with a CUDA device: the tests marked gpu, then the expert pool's benchmark
## on the GPU (scripts/gpu_check.py, under 8 minutes on one H100/H200) -> bench/results/gpu.json (and $$OUT).
## It installs nothing: the venv's Python when there is one, else (or with `make gpu-check PYTHON=python3`) the
## image's, with the wheels of scripts/gpu_wheels.sh on PYTHONPATH.
GPU_PYTHON = $(if $(filter command line,$(origin PYTHON)),$(PYTHON),$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)))
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
