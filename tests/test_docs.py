"""The docs' measurement tables are the benchmark JSON, rendered, each with the commit and date it was measured
at: a stale or edited table fails here, and so does a link to a file or heading that does not exist."""

from __future__ import annotations

import datetime
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMIT = re.compile(r"[0-9a-f]{40}(\+dirty)?")


@pytest.fixture
def scripts(monkeypatch) -> dict[str, ModuleType]:
    """The renderer and the stamp module, imported as the scripts import them (from their own directory)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return {name: importlib.import_module(name) for name in ("render_docs", "_measured", "tables_server")}


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_every_page_is_what_the_json_says(scripts) -> None:
    renderer = scripts["render_docs"]
    used = set()
    for page in renderer.pages():
        text = page.read_text()
        used |= {m.group("name") for m in renderer.SECTION.finditer(text)}
        assert renderer.render(text) == text, f"{page} is stale: run python scripts/render_docs.py"
    assert used == set(renderer.SECTIONS), f"sections on no page: {set(renderer.SECTIONS) - used}"
    assert renderer.main(["--check"]) == 0


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md", "docs/benchmarks-routing.md"])
def test_a_changed_number_is_caught(scripts, tmp_path, page) -> None:
    renderer = scripts["render_docs"]
    text = (ROOT / page).read_text()
    first = next(renderer.SECTION.finditer(text))
    body = first.group("body")
    digit = next(i for i, c in enumerate(body) if c.isdigit())
    tampered = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1 :]
    copy = tmp_path / Path(page).name
    copy.write_text(text.replace(body, tampered, 1))
    assert renderer.main([str(copy), "--check"]) == 1
    assert renderer.main([str(copy)]) == 0 and copy.read_text() == text  # rendering puts it back


def test_every_result_file_says_when_it_was_measured(scripts) -> None:
    renderer, measured = scripts["render_docs"], scripts["_measured"]
    files = sorted(RESULTS.glob("*.json"))
    assert {f.name for f in files} >= {f for s in renderer.SECTIONS.values() for f in s.files}
    for path in files:
        stamp = json.loads(path.read_text())["measured"]
        assert COMMIT.fullmatch(stamp["commit"]), (path, stamp)
        assert datetime.datetime.fromisoformat(stamp["date"]).utcoffset() is not None, (path, stamp)
        assert f"measured at `{stamp['commit'][:10]}`" in measured.describe(stamp)
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    for section in ("variants", "server-load"):  # each generated table carries its stamp under it
        body = re.search(rf"<!-- generated:{section} -->\n(.*?)<!-- end:{section} -->", benchmarks, re.DOTALL)
        assert body and "measured at `" in body.group(1).rstrip().splitlines()[-1], section


def test_results_from_before_the_routing_rewrite_say_so(scripts) -> None:
    """The date test the renderer uses agrees with git's ancestry, and a stale server report's routed figures
    are labelled as the old router's (the docs once quoted two routing p50s as if they were one)."""
    measured, server = scripts["_measured"], scripts["tables_server"]
    rewrite = measured.ROUTING_REWRITE["commit"]
    if _git("cat-file", "-e", rewrite).returncode != 0:
        pytest.skip("git history without the routing rewrite (a shallow clone)")
    for path in sorted(RESULTS.glob("*.json")):
        stamp = json.loads(path.read_text())["measured"]
        commit = stamp["commit"].removesuffix("+dirty")
        if _git("cat-file", "-e", commit).returncode != 0:
            continue
        ancestor = commit != rewrite and _git("merge-base", "--is-ancestor", commit, rewrite).returncode == 0
        assert measured.predates(stamp) == ancestor, path.name
    report = json.loads((RESULTS / "server.json").read_text())
    old = {**report, "measured": {"commit": "0" * 40, "date": "2026-11-24T00:00:00+00:00"}}
    new = {**report, "measured": {"commit": "1" * 40, "date": "2026-12-24T00:00:00+00:00"}}
    assert "| routing (the router before `6630b25`), p50 |" in server.server_overhead(old)
    assert "routing p50 (the router before `6630b25`): at most" in server.server_targets(old)
    assert "router before" not in server.server_overhead(new) + server.server_targets(new)


def test_a_stamp_names_the_checkout(scripts, tmp_path) -> None:
    if shutil.which("git") is None or _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("no git checkout")
    stamp = scripts["_measured"].measured()
    assert stamp["commit"].removesuffix("+dirty") == _git("rev-parse", "HEAD").stdout.strip()
    changed = _git("diff", "--name-only", "HEAD").stdout.split()  # tracked files that differ, staged or not
    code = [path for path in changed if not path.startswith("bench/results/")]  # results are outputs, not code
    assert stamp["commit"].endswith("+dirty") == bool(code)
    taken = datetime.datetime.fromisoformat(stamp["date"])
    assert abs(datetime.datetime.now(datetime.UTC) - taken) < datetime.timedelta(minutes=5)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(path) if re.match(r"#{1,6} ", line)}


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(page) -> None:
    broken = []
    for line in _prose(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            missing_heading = anchor and file.suffix == ".md" and file.exists() and anchor not in _anchors(file)
            if not file.exists() or missing_heading:
                broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_the_link_check_can_fail(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[there](missing.md) [here](#title) [nowhere](#no-such-heading)\n")
    with pytest.raises(AssertionError, match=r"missing\.md.*no-such-heading"):
        test_every_relative_link_points_at_a_file(page)


def test_the_readme_reads_in_five_minutes() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
