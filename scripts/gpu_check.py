"""The prepared GPU check: the tests marked `gpu`, then the expert pool's benchmark on the GPU.

    make gpu-check                        # with the project's virtual environment
    make gpu-check PYTHON=python3         # without one: a bare CUDA PyTorch image plus carried wheels
    python3 scripts/gpu_check.py --device cpu --quick --out /tmp/gpu.json   # tiny, on the CPU (the suite's test)

1. Checks that every module it needs imports, and names the wheels to carry when one does not
   (`scripts/gpu_wheels.sh` downloads them; the README says how they travel).
2. Runs `python -m pytest -m gpu` on the test files that mark tests `gpu` (found by reading tests/*.py): only
   those files, since collecting the whole suite would import faiss, the embedder and FastAPI.
3. Runs `scripts/bench_core.py`'s measurement on the device (bf16, 8 layers of Qwen3-30B-A3B's layer shape,
   batch 1, 8, 32 and 128): the pool with one pattern and three mixed, a task switch against the pinned
   host -> device copy floor, the batch-1 step against the time to read its bytes at the measured bandwidth.
4. Writes `bench/results/gpu.json` (the benchmark's report plus the tests' outcome, with the "measured"
   stamp) and copies it into `$OUT` when that is set, with the tests' log.

Exit status: 0 when the tests passed, 1 when they failed (the benchmark still runs and is written), 2 when a
module is missing or no CUDA device is there, 3 when the benchmark failed (its traceback and the tests'
outcome go to `$OUT/gpu_failed.json`). Sized to finish in under 8 minutes on one H100 or H200.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402

GPU_MARK = re.compile(r"^\s*@pytest\.mark\.gpu\b|^pytestmark\s*=.*pytest\.mark\.gpu\b", re.MULTILINE)
#: what a bare CUDA PyTorch image brings (import name -> package), and what the check needs carried beside it:
#: `server.config` (imported by the pool's modules) is pydantic settings
IMAGE = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "numpy": "numpy"}
IMAGE_TOOLS = {"pytest": "pytest"}
CARRIED = {
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "pydantic_settings": "pydantic-settings",
    "dotenv": "python-dotenv",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "typing_extensions": "typing-extensions",
}
#: carried too, in place of the image's release (5.17 when last read): the GPU then runs the transformers CI runs
LOCKED_TRANSFORMERS = "transformers"
LOCK = ROOT / "requirements" / "cuda.txt"
TESTS_TIMEOUT_S = 240


def wheels(lock: Path = LOCK) -> list[str]:
    """`package==version` of every wheel to carry, at the versions of the CUDA lock."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.MULTILINE))
    return [f"{package}=={pins[package]}" for package in sorted({*CARRIED.values(), LOCKED_TRANSFORMERS})]


def missing_modules() -> list[str]:
    """The packages (pip names) of the modules the check imports that this Python cannot find."""
    needed = {**IMAGE, **IMAGE_TOOLS, **CARRIED}
    return sorted({package for module, package in needed.items() if importlib.util.find_spec(module) is None})


def gpu_test_files(root: Path = ROOT) -> list[Path]:
    """The test files that mark a test (or the whole module) `gpu`."""
    return [path for path in sorted((root / "tests").glob("test_*.py")) if GPU_MARK.search(path.read_text())]


def run_gpu_tests(files: list[Path], log: Path | None) -> dict[str, Any]:
    """`pytest -m gpu FILES` in a child process (its own CUDA context and warnings filters): the outcome."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *map(str, files)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=TESTS_TIMEOUT_S)
        output, returncode = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        output, returncode = (expired.stdout or "") + f"\ntimed out after {TESTS_TIMEOUT_S} s\n", 124
    print(output, flush=True)
    if log is not None:
        log.write_text(output)
    lines = [line.strip("= ") for line in output.strip().splitlines() if line.strip()]
    return {
        "files": [str(path.relative_to(ROOT)) for path in files],
        "returncode": returncode,
        "summary": lines[-1] if lines else "no output",
        "seconds": round(time.perf_counter() - started, 1),
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (with --device cpu: the suite's test)")
    parser.add_argument("--layers", type=int, help="layers of the benchmark checkpoint (8)")
    parser.add_argument("--dir", type=Path, help="the benchmark checkpoint's directory (default bench/checkpoints/)")
    parser.add_argument("--out", type=Path, help="the JSON (default bench/results/gpu.json; none with --quick)")
    parser.add_argument("--skip-tests", action="store_true", help="the benchmark alone")
    parser.add_argument("--wheels", action="store_true", help="print the wheels to carry (pinned) and stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.wheels:
        print(" ".join(wheels()))
        return 0
    missing = missing_modules()
    if missing:
        print(f"gpu-check: missing {', '.join(missing)}: carry their wheels (scripts/gpu_wheels.sh, README)")
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device (use --device cpu --quick to try the script on the CPU)")
        return 2
    started = time.perf_counter()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    tests = None
    if not args.skip_tests:
        tests = run_gpu_tests(gpu_test_files(), out_dir / "gpu_tests.log" if out_dir else None)
    bench_args = ["--device", args.device, *(["--quick"] if args.quick else [])]
    bench_args += [
        *(["--layers", str(args.layers)] if args.layers else []),
        *(["--dir", str(args.dir)] if args.dir else []),
    ]
    settings = bench_core.settings_from(bench_core.parser().parse_args(bench_args))
    try:
        report = bench_core.run(settings)
    except Exception:  # what failed comes back under $OUT beside the tests' outcome; the docs keep the last run
        failure = {"measured": bench_core.measured(), "tests": tests, "error": traceback.format_exc()}
        print(failure["error"], file=sys.stderr)
        bench_core.write(failure, out_dir / "gpu_failed.json" if out_dir else None)
        return 3
    report["tests"] = tests
    report["seconds"] = round(time.perf_counter() - started, 1)
    from tables_core import gpu_check

    print(gpu_check(report))
    bench_core.write(report, args.out or (None if args.quick else bench_core.ROOT / "bench" / "results" / "gpu.json"))
    if out_dir is not None:  # the device tool brings back what is under $OUT
        bench_core.write(report, out_dir / "gpu.json")
    return 0 if tests is None or tests["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
