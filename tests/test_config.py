"""Server configuration: sizes, environment variables, validation; JSON logs; pattern files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pattern_store.pattern import PatternError, pattern_from_bundle, pattern_to_bundle
from pattern_store.store import PatternStore
from server.cli import build_parser, main, serve_config
from server.config import load_config, parse_bytes
from server.logs import JsonFormatter

from conftest import DEMO_MOE


@pytest.mark.parametrize(
    ("text", "expected"), [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("2.5GB", 2_500_000_000), ("1024", 1024)]
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "4 parsecs", "GiB", "-1GiB"])
def test_bad_sizes_are_clear_errors(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_bytes(text)


def test_every_serve_flag_reads_its_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("TASKMOE_CACHE_BUDGET", "8GiB")
    monkeypatch.setenv("TASKMOE_ADMIN_KEY", "secret")
    monkeypatch.setenv("TASKMOE_ROUTE_THRESHOLD", "0.5")
    config = serve_config(build_parser().parse_args(["serve", "--model", str(DEMO_MOE)]))
    assert (config.cache_budget, config.admin_key, config.route_threshold) == (8 * 2**30, "secret", 0.5)
    flags = build_parser().parse_args(["serve", "--model", str(DEMO_MOE), "--cache-budget", "1GiB"])
    assert serve_config(flags).cache_budget == 2**30  # flags win


def test_config_validation(tmp_path) -> None:
    assert load_config(model=DEMO_MOE, store=tmp_path).served_name == "demo-moe"
    with pytest.raises(ValueError, match="not a model directory"):
        load_config(model=tmp_path, store=tmp_path)
    with pytest.raises(ValueError, match="cache-budget"):
        load_config(model=DEMO_MOE, store=tmp_path, cache_budget=0)
    assert main(["serve", "--model", str(tmp_path)]) == 2  # a clear error, not a traceback


def test_json_log_lines_carry_the_request_fields() -> None:
    record = logging.makeLogRecord({"name": "taskmoe.access", "msg": "POST %s", "args": ("/v1/x",), "levelno": 20})
    record.request_id, record.status = "abc", 200
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "POST /v1/x" and entry["request_id"] == "abc" and entry["status"] == 200


def test_pattern_file_round_trip_and_garbage(tmp_path: Path) -> None:
    store = PatternStore(DEMO_MOE / "patterns", create=False)
    original = store.get("sort")
    copy = pattern_from_bundle(pattern_to_bundle(original))
    assert copy.selection == original.selection and copy.examples == original.examples
    assert all((copy.scores[layer] == original.scores[layer]).all() for layer in original.scores)
    for garbage in (b"", b"\x00" * 16, b"hello world, not a pattern", pattern_to_bundle(original)[:-10]):
        with pytest.raises(PatternError):
            pattern_from_bundle(garbage)
    file = tmp_path / "sort.safetensors"
    assert main(["pattern-file", "export", str(file), "--store", str(DEMO_MOE / "patterns"), "--name", "sort"]) == 0
    assert main(["pattern-file", "import", str(file), "--store", str(tmp_path / "store")]) == 0
    assert PatternStore(tmp_path / "store").names() == ["sort"]
    assert main(["pattern-file", "import", str(file), "--store", str(tmp_path / "store")]) == 2  # exists
