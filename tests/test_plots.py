"""Pictures of task patterns and of routing: exact overlap numbers, valid PNGs, and `taskmoe patterns plot`."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from pattern_store.pattern import TaskPattern
from pattern_store.selection import Selection
from pattern_store.store import PatternStore
from server import plots
from server.cli import main
from server.plots import (
    jaccard,
    kept_pairs,
    kept_shares,
    layer_widths,
    mean_off_diagonal,
    overlap_matrix,
    plot_confusion,
    plot_patterns,
    row_shares,
)

from conftest import DEMO_DENSE, ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pattern(
    name: str,
    layers: dict[int, list[int]],
    widths: dict[int, int],
    kind: str = "moe_experts",
    fingerprint: str = "f" * 64,
) -> TaskPattern:
    return TaskPattern(
        name=name,
        selection=Selection(kind, layers),
        scores={layer: torch.rand(width) for layer, width in widths.items()},
        method="reap" if kind == "moe_experts" else "seap",
        parameters={},
        model_fingerprint=fingerprint,
        created=1.0,
        calibration_prompts=3,
    )


def _assert_png(path) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0, "the picture is not blank"
    assert not list(path.parent.glob(".*.tmp")), "no temporary file is left behind"
    return pixels.shape[0], pixels.shape[1]


# -- the numbers -------------------------------------------------------------------------------------


def test_jaccard_is_exact() -> None:
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard({(0, 1), (0, 2)}, {(0, 1), (0, 2), (1, 0), (1, 1)}) == 0.5
    assert jaccard({1, 2}, {3}) == 0.0
    assert jaccard({1, 2}, [2, 1, 1]) == 1.0
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, set()) == 0.0
    assert jaccard(range(4), range(1, 7)) == 3 / 7


def test_kept_pairs_include_the_layers_a_selection_leaves_whole() -> None:
    selection = Selection("moe_experts", {0: [3, 0]})
    assert kept_pairs(selection, {0: 4, 1: 3}) == {(0, 0), (0, 3), (1, 0), (1, 1), (1, 2)}
    assert kept_shares(selection, {0: 4, 1: 3}) == {0: 0.5, 1: 1.0}
    # a layer without a known width is still known by what it keeps
    assert kept_pairs(selection, {}) == {(0, 0), (0, 3)}
    assert kept_shares(selection, {}) == {0: 0.5}


def test_layer_widths_come_from_the_scores_with_a_fallback() -> None:
    pattern = _pattern("a", {0: [1]}, {0: 16, 2: 8})
    assert layer_widths(pattern) == {0: 16, 2: 8}
    assert layer_widths(pattern, {1: 4, 2: 99}) == {0: 16, 1: 4, 2: 8}, "scores win over the fallback"


def test_overlap_matrix_is_exact_and_na_across_groups() -> None:
    a = kept_pairs(Selection("moe_experts", {0: [0, 1], 1: [0]}), {0: 4, 1: 2})
    b = kept_pairs(Selection("moe_experts", {0: [1, 2], 1: [0]}), {0: 4, 1: 2})
    c = kept_pairs(Selection("moe_experts", {0: [2, 3]}), {0: 4, 1: 2})  # layer 1 whole: (1, 0) and (1, 1)
    matrix = overlap_matrix([a, b, c])
    assert matrix.tolist() == [[1.0, 2 / 4, 1 / 6], [2 / 4, 1.0, 2 / 5], [1 / 6, 2 / 5, 1.0]]
    assert mean_off_diagonal(matrix) == pytest.approx((1 / 2 + 1 / 6 + 2 / 5) / 3, abs=1e-15)
    grouped = overlap_matrix([a, b, c], groups=["x", "x", "y"])
    assert grouped[0, 1] == 0.5 and grouped[2, 2] == 1.0
    assert math.isnan(grouped[0, 2]) and math.isnan(grouped[2, 1])
    assert mean_off_diagonal(grouped) == 0.5, "pairs that cannot be compared do not count"
    assert mean_off_diagonal(overlap_matrix([a])) is None
    with pytest.raises(ValueError, match="groups"):
        overlap_matrix([a, b], groups=["x"])


def test_row_shares_normalise_each_row_and_keep_empty_rows_zero() -> None:
    shares = row_shares([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    assert shares.tolist() == [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]]
    with pytest.raises(ValueError, match="non-negative"):
        row_shares([[1, -1]])
    with pytest.raises(ValueError, match="non-negative"):
        row_shares([[1, float("nan")]])
    with pytest.raises(ValueError, match="2-D"):
        row_shares([1, 2])


# -- pictures ----------------------------------------------------------------------------------------


@pytest.fixture()
def moe_store(tmp_path) -> PatternStore:
    store = PatternStore(tmp_path / "store")
    widths = {0: 4, 1: 4}
    store.add(_pattern("arith", {0: [0, 1], 1: [0, 1]}, widths))
    store.add(_pattern("sort", {0: [1, 2], 1: [0, 1]}, widths))
    store.add(_pattern("upper", {0: [2, 3], 1: [2, 3]}, widths))
    return store


def test_plot_patterns_writes_a_png_and_reports_exact_overlaps(moe_store, tmp_path) -> None:
    out = tmp_path / "pictures" / "nested" / "patterns.png"  # parent directories are made
    summary = plot_patterns(moe_store, out)
    _assert_png(out)
    assert summary.patterns == ("arith", "sort", "upper") and summary.layers == 2
    # arith/sort share 3 of 5 pairs, arith/upper none, sort/upper 1 of 7
    assert summary.overlap.tolist() == [[1.0, 3 / 5, 0.0], [3 / 5, 1.0, 1 / 7], [0.0, 1 / 7, 1.0]]
    assert summary.mean_jaccard == pytest.approx((3 / 5 + 1 / 7) / 3, abs=1e-15)
    assert summary.notes == ()
    assert summary.line() == "3 patterns (3 moe_experts), 2 layers, mean Jaccard 0.248 over 3 pairs"


def test_a_second_plot_replaces_the_first_and_a_failed_one_leaves_it(moe_store, tmp_path, monkeypatch) -> None:
    out = tmp_path / "patterns.png"
    out.write_bytes(b"old")
    plot_patterns(moe_store, out)
    first = out.read_bytes()
    assert first[:8] == PNG_MAGIC

    def broken(self, *args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(plots.Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        plot_patterns(moe_store, out)
    assert out.read_bytes() == first, "a failed write leaves the previous picture whole"
    assert not list(tmp_path.glob(".*.tmp"))


def test_patterns_of_different_kinds_models_and_sizes_do_not_crash(tmp_path) -> None:
    store = PatternStore(tmp_path / "store")
    store.add(_pattern("small", {0: [0, 1], 1: [3]}, {0: 4, 1: 4}))
    store.add(_pattern("wide", {0: list(range(0, 64, 2))}, {0: 64, 1: 64, 2: 64}, fingerprint="e" * 64))
    store.add(_pattern("noscores", {0: [0, 5]}, {}))  # the width of layer 0 is unknown
    store.add(_pattern("dense", {1: [0, 1, 2]}, {0: 8, 1: 8, 2: 8}, kind="dense_channels", fingerprint="d" * 64))
    (store.pattern_dir / "broken.json").write_text("{not json")
    store.refresh()
    out = tmp_path / "mixed.png"
    summary = plot_patterns(store, out)
    _assert_png(out)
    assert summary.patterns == ("dense", "noscores", "small", "wide")
    assert summary.kinds == ("dense_channels", "moe_experts", "moe_experts", "moe_experts")
    assert summary.layers == 3
    names = list(summary.patterns)
    small, wide, dense, noscores = (names.index(n) for n in ("small", "wide", "dense", "noscores"))
    assert math.isnan(summary.overlap[small, wide]) and math.isnan(summary.overlap[small, dense])
    # noscores keeps {(0,0), (0,5)}; small keeps {(0,0), (0,1), (1,3)}
    assert summary.overlap[small, noscores] == 1 / 4
    assert summary.mean_jaccard == 1 / 4
    notes = "\n".join(summary.notes)
    assert "noscores: layer 0 has no scores" in notes
    assert "broken.json: skipped" in notes
    assert "different kinds or models" in notes
    # dense: layer 0 and 2 left whole, layer 1 keeps 3 of 8
    assert kept_shares(store.get("dense").selection, layer_widths(store.get("dense"))) == {0: 1.0, 1: 3 / 8, 2: 1.0}


def test_an_empty_store_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="holds no patterns"):
        plot_patterns(PatternStore(tmp_path / "empty"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_confusion_writes_a_png_and_checks_its_shape(tmp_path) -> None:
    out = tmp_path / "routing" / "confusion.png"
    plot_confusion(
        [[8, 1, 0, 1], [0, 9, 0, 1], [0, 0, 0, 0]],
        ["arith", "sort", "upper"],
        ["arith", "sort", "upper", "full"],
        out,
        "t",
    )
    _assert_png(out)
    with pytest.raises(ValueError, match="shape"):
        plot_confusion([[1, 2]], ["a"], ["a", "b", "c"], tmp_path / "bad.png", "t")
    with pytest.raises(ValueError, match="non-negative"):
        plot_confusion(np.array([[1, -2]]), ["a"], ["a", "b"], tmp_path / "bad.png", "t")
    assert not (tmp_path / "bad.png").exists()


# -- the command line --------------------------------------------------------------------------------


def test_cli_plot_prints_the_file_and_the_summary(moe_store, tmp_path, capsys) -> None:
    out = tmp_path / "cli" / "patterns.png"
    assert main(["patterns", "plot", "--store", str(moe_store.root), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"wrote {out}", "3 patterns (3 moe_experts), 2 layers, mean Jaccard 0.248 over 3 pairs"]
    _assert_png(out)


def test_cli_plot_of_the_dense_demo_store(tmp_path, capsys) -> None:
    out = tmp_path / "dense.png"
    assert main(["patterns", "plot", "--store", str(DEMO_DENSE / "patterns"), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()[1]
    assert summary.startswith("7 patterns (7 dense_channels), 4 layers, mean Jaccard 0.")
    _assert_png(out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "patterns plot needs --out FILE.png"),
        (["arith", "--out", "{tmp}/x.png"], "takes no pattern name"),
        (["--out", "{tmp}"], "is a directory"),
        (["--out", "{tmp}/x.nope"], "cannot write a .nope picture"),
    ],
)
def test_cli_plot_errors_are_one_line(moe_store, tmp_path, capsys, extra, message) -> None:
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    assert main(["patterns", "plot", *extra, "--store", str(moe_store.root)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.nope")) and not list(tmp_path.glob("x.png"))


def test_cli_plot_of_an_empty_or_missing_store(tmp_path, capsys) -> None:
    PatternStore(tmp_path / "empty")
    assert main(["patterns", "plot", "--store", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "the store holds no patterns" in capsys.readouterr().err
    assert main(["patterns", "plot", "--store", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a pattern store" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_the_command_line_does_not_load_matplotlib_until_it_plots() -> None:
    code = "import sys, server.cli; server.cli.build_parser(); print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


WITHOUT_MATPLOTLIB = """
import importlib.abc, sys

class NoMatplotlib(importlib.abc.MetaPathFinder):  # an environment installed without the extra `plots`
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoMatplotlib())
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_plot_without_matplotlib_says_how_to_install_it(moe_store, tmp_path) -> None:
    out = tmp_path / "x.png"
    command = [sys.executable, "-c", WITHOUT_MATPLOTLIB, "patterns", "plot", "--store", str(moe_store.root)]
    result = subprocess.run([*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "pip install 'taskmoe[plots]'" in result.stderr
    assert not out.exists()
    listed = subprocess.run(
        [*command[:3], "patterns", "list", "--store", str(moe_store.root)], cwd=ROOT, capture_output=True, check=False
    )
    assert listed.returncode == 0  # the other commands never needed matplotlib
