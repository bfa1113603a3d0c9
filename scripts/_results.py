"""The benchmark results the docs are rendered from: `bench/results/*.json`, one file per benchmark script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

Report = dict[str, Any]


def load(name: str) -> Report:
    """The result file `name` (e.g. "pruning.json"), parsed."""
    return json.loads((RESULTS / name).read_text())
