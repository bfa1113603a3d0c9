#!/usr/bin/env python3
"""How long `--keep auto` takes through the real entry point: `taskmoe calibrate` run alone, one pattern at a
time, per demo MoE model and task (loading included, torch's default threads). `eval_keep_auto.py` times
the calibration inside its own process beside another benchmark; this is what a user waits for.

    python scripts/bench_keep_auto_time.py [--only MODEL] [--tasks T ...] [--refine e2e] [--prompts 512]
                                           [--out bench/results/keep_auto_seconds.json]

Target (issue 22): at most 5 minutes a pattern on this CPU. Run it on a quiet machine: the seconds are wall
time. Two `--only` runs with the same settings compose in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _measured import measured  # noqa: E402

MODELS = ("demo-moe", "demo-moe-fine")
LIMIT_SECONDS = 300.0
CHOSEN = re.compile(r"keep auto: (\d+) of (\d+) experts")


def calibration_file(task: str, prompts: int, folder: Path) -> Path:
    """The task's calibration exchanges (the seed `eval_keep_auto.py` calibrates on) as the JSONL the command
    line reads."""
    from demo.calibration import calibration_texts

    path = folder / f"{task}.jsonl"
    with path.open("w") as out:
        for text in calibration_texts(task, prompts):
            out.write(json.dumps({"prompt": text.prompt, "response": text.response}) + "\n")
    return path


def time_one(model: Path, task: str, data: Path, store: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One `taskmoe calibrate --keep auto` run: its wall seconds and the count it chose."""
    command = [
        str(Path(sys.executable).with_name("taskmoe")), "calibrate", "--model", str(model), "--store", str(store),
        "--name", task, "--prompts", str(data), "--keep", "auto", "--target", str(args.target),
        "--refine", args.refine, "--substitute", args.substitute, "--quiet",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{model.name} {task}: taskmoe calibrate exited {done.returncode}: {done.stderr[-2000:]}")
    chosen = CHOSEN.search(done.stdout)
    if chosen is None:
        raise SystemExit(f"{model.name} {task}: no keep-auto count in the output: {done.stdout[-2000:]}")
    return {"seconds": round(seconds, 1), "experts": int(chosen.group(1)), "of": int(chosen.group(2))}


def main(argv: list[str] | None = None) -> int:
    from demo.tasks import TASK_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--only", choices=MODELS)
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    parser.add_argument("--prompts", type=int, default=512, help="calibration exchanges per task (a quarter held out)")
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--refine", choices=("none", "local", "e2e"), default="e2e")
    parser.add_argument("--substitute", choices=("none", "novice", "low-rank"), default="none")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "keep_auto_seconds.json")
    args = parser.parse_args(argv)

    settings = {"prompts": args.prompts, "target": args.target, "refine": args.refine, "substitute": args.substitute}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    models = dict(previous.get("models", {})) if previous.get("settings") == settings and args.only else {}
    for name in [args.only] if args.only else MODELS:
        rows: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="keep-auto-time-") as folder:
            for task in args.tasks:
                data = calibration_file(task, args.prompts, Path(folder))
                rows[task] = time_one(args.models / name, task, data, Path(folder) / "store", args)
                print(f"{name} {task}: {rows[task]['experts']} of {rows[task]['of']}, {rows[task]['seconds']:.0f} s",
                      flush=True)  # fmt: skip
        slowest = max(row["seconds"] for row in rows.values())
        models[name] = {"tasks": rows, "slowest_seconds": slowest, "met": slowest <= LIMIT_SECONDS}
    report = {"settings": settings, "limit_seconds": LIMIT_SECONDS, "models": models, "measured": measured()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
