"""The README's measurement tables are the benchmark JSON, rendered: a stale table fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "scripts" / "render_readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_sections_match_the_json() -> None:
    renderer = _renderer()
    text = (ROOT / "README.md").read_text()
    sections = [m.group("name") for m in renderer.SECTION.finditer(text)]
    expected = {"pruning-moe", "pruning-dense", "variants", "routing", "server-overhead", "server-load"}
    expected |= {"server-mixed", "server-cycling", "server-prefill", "server-decoder", "server-targets"}
    assert expected <= set(sections), sections
    assert renderer.render(text) == text, "README tables are stale: run python scripts/render_readme.py"


def test_a_changed_number_is_caught(tmp_path) -> None:
    renderer = _renderer()
    text = (ROOT / "README.md").read_text()
    first = next(renderer.SECTION.finditer(text))
    body = first.group("body")
    digit = next(i for i, c in enumerate(body) if c.isdigit())
    tampered = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1 :]
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(body, tampered, 1))
    assert renderer.main(["--readme", str(readme), "--check"]) == 1
