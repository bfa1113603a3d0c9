"""Print the per-task greedy accuracy of a model directory on held-out demo examples.

    python scripts/eval_tasks.py models/demo-moe [-n 200] [--json]

The same as `taskmoe eval MODEL_DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
