#!/usr/bin/env bash
# Download the wheels `make gpu-check` needs beside a bare CUDA PyTorch image (Python 3.12, x86-64) into .whl/:
# pydantic and pydantic-settings with their own needs (server/config.py imports them) and the lock's
# transformers, at the versions of requirements/cuda.txt (`python3 scripts/gpu_check.py --wheels` lists them).
# On the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site make gpu-check PYTHON=python3
# PYTHON_VERSION=3.11 (say) fetches them for another Python.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"  # .whl/ stays out of git (a worktree shares the file)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$platform")
done
# shellcheck disable=SC2046  # one argument per wheel
python3 -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  "${platforms[@]}" -d .whl $(python3 scripts/gpu_check.py --wheels)
ls -l .whl
