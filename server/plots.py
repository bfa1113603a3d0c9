"""Pictures of task patterns (what each keeps, how much they share) and of routing (where queries went).

The numbers behind the pictures are pure functions (`jaccard`, `kept_pairs`, `overlap_matrix`,
`row_shares`, ...) so that tests can check them exactly; the drawing uses `matplotlib.figure.Figure`
directly, which needs no display and no global backend state, so a server or a script can call it from
any thread. Every picture is written atomically: a reader sees the old file or the new one, never a
half-written PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pattern_store.store import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from pattern_store.pattern import TaskPattern
    from pattern_store.selection import Selection
    from pattern_store.store import PatternStore

DPI = 120
MAX_NOTES = 12
"""Notes beyond this many are counted, not listed: the picture must stay readable."""
MAX_ANNOTATED = 24
"""Overlap matrices of more patterns than this are drawn without numbers in the cells."""
_EMPTY_CELL = "#ececec"
_UNITS = {"moe_experts": "experts", "dense_channels": "channels"}


# -- the numbers -------------------------------------------------------------------------------------


def jaccard(a: Collection[Hashable], b: Collection[Hashable]) -> float:
    """|A∩B| / |A∪B|: 1 for identical kept sets, 0 for disjoint ones. Two empty sets are identical (1)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def layer_widths(pattern: TaskPattern, fallback: Mapping[int, int] | None = None) -> dict[int, int]:
    """Experts (or channels) per layer. A selection names only what it keeps, so the width comes from the
    pattern's scores (one per expert or channel); `fallback` covers layers that have no scores."""
    widths = {int(layer): int(count) for layer, count in (fallback or {}).items()}
    widths.update({int(layer): int(scores.numel()) for layer, scores in pattern.scores.items()})
    return dict(sorted(widths.items()))


def kept_pairs(selection: Selection, widths: Mapping[int, int]) -> frozenset[tuple[int, int]]:
    """Every (layer, index) the variant keeps. A layer the selection does not name keeps all its `widths`
    entries: those weights are in the variant too, and two patterns that both keep them share them."""
    pairs = {(layer, index) for layer, kept in selection.layers.items() for index in kept}
    for layer, width in widths.items():
        if selection.kept(layer) is None:
            pairs.update((layer, index) for index in range(width))
    return frozenset(pairs)


def kept_shares(selection: Selection, widths: Mapping[int, int]) -> dict[int, float]:
    """Share of each layer's experts (or channels) that the variant keeps; 1.0 for a layer it leaves whole."""
    shares = {}
    for layer in sorted(set(widths) | set(selection.layers)):
        kept = selection.kept(layer)
        shares[layer] = 1.0 if kept is None else len(kept) / max(widths.get(layer, 0), max(kept) + 1)
    return shares


def overlap_matrix(kept: Sequence[Collection[Hashable]], groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """Pairwise `jaccard` of kept sets. With `groups` (e.g. kind and model of each pattern), pairs from
    different groups are NaN: expert 3 of one model is not expert 3 of another, nor channel 3."""
    if groups is not None and len(groups) != len(kept):
        raise ValueError(f"{len(kept)} kept sets but {len(groups)} groups")
    n = len(kept)
    matrix = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i, n):
            if groups is None or groups[i] == groups[j]:
                matrix[i, j] = matrix[j, i] = jaccard(kept[i], kept[j])
    return matrix


def mean_off_diagonal(matrix: np.ndarray) -> float | None:
    """Mean over distinct pairs (above the diagonal) that have a value; None when there is none."""
    values = np.asarray(matrix, dtype=float)[np.triu_indices(len(matrix), k=1)]
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def row_shares(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Each row divided by its sum (a confusion matrix's "of this task's queries, the share that went
    there"); a row without queries stays all zero rather than NaN."""
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2:
        raise ValueError(f"a confusion matrix is 2-D, got shape {counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("a confusion matrix holds finite, non-negative counts")
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


# -- writing -----------------------------------------------------------------------------------------


def save_figure(figure: Figure, out: Path, dpi: int = DPI) -> None:
    """Write the figure to `out` (format from its suffix, PNG without one) through a temporary file in the
    same directory and a rename, so a reader (a browser, a docs build) never sees half a picture."""
    out = Path(out)
    fmt = out.suffix[1:].lower() or "png"
    supported = figure.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{out}: cannot write a .{fmt} picture; use one of .{', .'.join(sorted(supported))}")
    rendered = io.BytesIO()
    figure.savefig(rendered, format=fmt, dpi=dpi)  # a failed rendering never touches `out`
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, rendered.getvalue())


# -- patterns ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PatternsSummary:
    """What `plot_patterns` drew, for the command line's one-line report and for tests."""

    patterns: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: int  # distinct layer numbers over all patterns
    overlap: np.ndarray  # Jaccard per pair; NaN between patterns of different kinds or models
    mean_jaccard: float | None  # over distinct comparable pairs
    notes: tuple[str, ...]

    def line(self) -> str:
        counts = {kind: self.kinds.count(kind) for kind in dict.fromkeys(self.kinds)}
        kinds = " + ".join(f"{n} {kind}" for kind, n in counts.items())
        pairs = int(np.isfinite(self.overlap[np.triu_indices(len(self.patterns), k=1)]).sum())
        mean = "n/a" if self.mean_jaccard is None else f"{self.mean_jaccard:.3f} over {pairs} pairs"
        return f"{len(self.patterns)} patterns ({kinds}), {self.layers} layers, mean Jaccard {mean}"


@dataclass
class _Drawn:
    """One pattern, reduced to what the picture needs."""

    pattern: TaskPattern
    widths: dict[int, int]
    kept: frozenset[tuple[int, int]]
    colour: str


def _prepare(pattern: TaskPattern, fallback: Mapping[int, int] | None, notes: list[str], colour: str) -> _Drawn:
    widths = layer_widths(pattern, fallback)
    for layer, kept in pattern.selection.layers.items():
        if layer not in widths:
            notes.append(f"{pattern.name}: layer {layer} has no scores; drawn up to its highest kept index")
            widths[layer] = max(kept) + 1
        elif max(kept) >= widths[layer]:
            notes.append(f"{pattern.name}: layer {layer} keeps index {max(kept)} of only {widths[layer]} scores")
            widths[layer] = max(kept) + 1
    widths = dict(sorted(widths.items()))
    return _Drawn(pattern, widths, kept_pairs(pattern.selection, widths), colour)


def _colours(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(n)]


def _index_ticks(width: int) -> list[int]:
    step = next(s for s in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 256, 512, 1024) if width / s <= 16)
    return list(range(0, width, step))


def _draw_grid(ax: Axes, drawn: _Drawn) -> None:
    """Rows: layers; columns: expert index; a filled cell is an expert the variant keeps."""
    layers = list(drawn.widths)
    width = max(drawn.widths.values())
    mask = np.full((len(layers), width), np.nan)  # NaN: beyond this layer's width (blank)
    for row, layer in enumerate(layers):
        mask[row, : drawn.widths[layer]] = 0.0
    for layer, index in drawn.kept:
        mask[layers.index(layer), index] = 1.0
    cmap = ListedColormap([_EMPTY_CELL, drawn.colour]).with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(mask), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if width <= 64:  # cell borders; beyond that they would be all there is to see
        ax.set_xticks(np.arange(-0.5, width, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, len(layers), 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    ax.set_xticks(_index_ticks(width))
    ax.set_yticks(range(len(layers)), [f"L{layer}" for layer in layers])
    ax.tick_params(labelsize=7)
    total = sum(drawn.widths.values())
    coverage = drawn.pattern.parameters.get("coverage")
    covered = f", coverage {coverage['mass']:.2f}" if isinstance(coverage, dict) and "mass" in coverage else ""
    searched = drawn.pattern.parameters.get("keep_search")
    if isinstance(searched, dict) and "estimate" in searched:  # `--keep auto`: what the count was chosen for
        covered += f", keep auto: an estimated {100 * searched['estimate']:.0f}% of answers kept"
    ax.set_title(
        f"{drawn.pattern.name}: keeps {len(drawn.kept)}/{total} ({100 * len(drawn.kept) / total:.0f}%){covered}",
        fontsize=9,
        color=drawn.colour,
        fontweight="bold",
    )
    ax.set_xlabel("expert", fontsize=8)


def _draw_shares(ax: Axes, drawn: Sequence[_Drawn]) -> None:
    """Grouped bars: per layer, the share of channels each dense pattern keeps."""
    layers = sorted({layer for d in drawn for layer in d.widths})
    bar = 0.8 / len(drawn)
    for k, d in enumerate(drawn):
        shares = kept_shares(d.pattern.selection, d.widths)
        xs = [i - 0.4 + bar * (k + 0.5) for i, layer in enumerate(layers) if layer in shares]
        ys = [100 * shares[layer] for layer in layers if layer in shares]
        ax.bar(xs, ys, width=bar, color=d.colour, label=d.pattern.name)
    widths = [max(d.widths.get(layer, 0) for d in drawn) for layer in layers]
    ax.set_xticks(range(len(layers)), [f"L{layer}\nof {width}" for layer, width in zip(layers, widths, strict=True)])
    ax.set_ylim(0, 105)
    ax.set_ylabel("channels kept (%)", fontsize=8)
    ax.set_xlabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title("Dense patterns: share of MLP channels kept per layer", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=1 if len(drawn) <= 12 else 2)


def _draw_overlap(ax: Axes, drawn: Sequence[_Drawn], matrix: np.ndarray, unit: str) -> None:
    """The Jaccard matrix, each cell annotated; grey "n/a" where the patterns cannot be compared."""
    from matplotlib import colormaps

    n = len(drawn)
    cmap = colormaps["Blues"].with_extremes(bad=_EMPTY_CELL)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    names = [d.pattern.name for d in drawn]
    ax.set_xticks(range(n), names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    for label, d in zip([*ax.get_xticklabels(), *ax.get_yticklabels()], [*drawn, *drawn], strict=True):
        label.set_color(d.colour)
    ax.tick_params(labelsize=8)
    if n <= MAX_ANNOTATED:
        size = max(5.0, min(9.0, 120 / n))
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                text = "n/a" if math.isnan(value) else f"{value:.2f}"
                colour = "white" if not math.isnan(value) and value > 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=size, color=colour)
    ax.set_title(f"Overlap of kept {unit}: Jaccard |A∩B| / |A∪B|", fontsize=9)
    bar = ax.inset_axes((1.04, 0.0, 0.04, 1.0))  # the matrix's own height, whatever its box
    ax.figure.colorbar(image, cax=bar).ax.tick_params(labelsize=7)


def _layout(
    moe: Sequence[_Drawn], dense: Sequence[_Drawn], patterns: int, notes: int
) -> tuple[Figure, list[Axes], Axes | None, Axes, Axes | None]:
    """MoE grids on the left; on the right the dense bars (if any) over the overlap matrix; notes below.
    Sizes are in inches (a grid cell about 0.2 wide, a layer row about 0.3 high), and the number of grid
    columns is the one that makes the picture least lopsided."""
    side = min(10.0, 2.4 + 0.45 * patterns)
    shares_width, shares_height = (max(5.0, 0.9 * max(len(d.widths) for d in dense) + 2.5), 3.4) if dense else (0, 0)
    right_width, right_height = max(side + 1.2, shares_width), side + shares_height
    left_width = left_height = 0.0
    if moe:
        deepest = max(len(d.widths) for d in moe)
        grid_width = min(7.0, max(3.2, 0.2 * max(max(d.widths.values()) for d in moe) + 1.0))
        grid_height = 0.9 + min(0.3, 5.0 / deepest) * deepest

        def lopsided(c: int) -> float:
            return abs((c * grid_width + right_width) / max(math.ceil(len(moe) / c) * grid_height, right_height) - 1.6)

        columns = min(range(1, min(len(moe), 4) + 1), key=lopsided)
        rows = math.ceil(len(moe) / columns)
        left_width, left_height = columns * grid_width, rows * grid_height
    top_height, notes_height = max(left_height, right_height), 0.3 + 0.2 * notes if notes else 0.0
    figure = Figure(figsize=(left_width + right_width, top_height + notes_height + 0.5), layout="constrained")
    outer = figure.subfigures(
        2 if notes else 1, 1, height_ratios=[top_height, notes_height] if notes else None, squeeze=False
    )[:, 0]
    grid_axes: list[Axes] = []
    right = outer[0]
    if moe:
        left, right = outer[0].subfigures(1, 2, width_ratios=[left_width, right_width])
        grid_axes = list(left.subplots(rows, columns, squeeze=False).flat)
        for ax in grid_axes[len(moe) :]:
            ax.set_visible(False)
        left.suptitle("MoE patterns: kept routed experts per layer (filled = kept)", fontsize=10)
    shares_ax: Axes | None = None
    if dense:
        shares_ax, overlap_ax = right.subplots(2, 1, height_ratios=[shares_height, side])
    else:
        overlap_ax = right.subplots()
    notes_ax = outer[1].subplots() if notes else None
    return figure, grid_axes[: len(moe)], shares_ax, overlap_ax, notes_ax


def plot_patterns(
    store: PatternStore,
    out: Path,
    widths: Mapping[int, int] | None = None,
    title: str | None = None,
) -> PatternsSummary:
    """Draw every pattern of `store` into one picture at `out` and say what was drawn.

    MoE patterns: a grid each (rows: layers, columns: experts, filled: kept). Dense patterns: the share of
    channels each keeps per layer. All patterns: their pairwise overlap (Jaccard of the (layer, index)
    pairs they keep, layers left whole included). `widths` gives experts (or channels) per layer for
    layers whose scores are missing. What cannot be drawn is said in a note on the figure.
    """
    names = store.names()
    if not names:
        raise ValueError(f"{store.root}: the store holds no patterns")
    notes = [f"{file}: {problem}" for file, problem in sorted(store.problems.items())]
    colours = _colours(len(names))
    drawn = [_prepare(store.get(name), widths, notes, colour) for name, colour in zip(names, colours, strict=True)]
    groups = [(d.pattern.kind, d.pattern.model_fingerprint) for d in drawn]
    matrix = overlap_matrix([d.kept for d in drawn], groups)
    if len(set(groups)) > 1:
        notes.append("overlap is n/a between patterns of different kinds or models: their indices mean other things")
    moe = [d for d in drawn if d.pattern.kind == "moe_experts"]
    dense = [d for d in drawn if d.pattern.kind == "dense_channels"]
    kinds = {d.pattern.kind for d in drawn}
    unit = _UNITS[kinds.pop()] if len(kinds) == 1 else "experts / channels"

    shown = notes[:MAX_NOTES] + ([f"... and {len(notes) - MAX_NOTES} more"] if len(notes) > MAX_NOTES else [])
    figure, grid_axes, shares_ax, overlap_ax, notes_ax = _layout(moe, dense, len(drawn), len(shown))
    models = sorted({d.pattern.model_fingerprint[:12] for d in drawn})
    model = "model" if len(models) == 1 else "models"
    title = title or f"Task patterns in {store.root}\n{len(drawn)} patterns of {model} {', '.join(models)}"
    figure.suptitle(title, fontsize=12, fontweight="bold")
    width, height = figure.get_size_inches()  # a long store path must not run off the picture
    figure.set_size_inches(max(width, 0.12 * max(len(line) for line in title.splitlines())), height)
    for ax, d in zip(grid_axes, moe, strict=True):
        _draw_grid(ax, d)
    if shares_ax is not None:
        _draw_shares(shares_ax, dense)
    _draw_overlap(overlap_ax, drawn, matrix, unit)
    if notes_ax is not None:
        notes_ax.axis("off")
        notes_ax.text(0, 1, "Notes:\n" + "\n".join(f"• {note}" for note in shown), va="top", fontsize=8)
    save_figure(figure, out)
    return PatternsSummary(
        patterns=tuple(names),
        kinds=tuple(d.pattern.kind for d in drawn),
        layers=len({layer for d in drawn for layer in d.widths}),
        overlap=matrix,
        mean_jaccard=mean_off_diagonal(matrix),
        notes=tuple(notes),
    )


# -- routing -----------------------------------------------------------------------------------------


def plot_confusion(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    rows: list[str],
    columns: list[str],
    out: Path,
    title: str,
) -> None:
    """A routing confusion matrix at `out`: rows are the queries' true tasks, columns where they went (which
    may add destinations such as "union" or "full" after the tasks). Cells show the row's percentage and are
    coloured by it, so tasks with few queries read as clearly as those with many; a task's own column is
    outlined."""
    counts = np.asarray(matrix, dtype=float)
    shares = row_shares(counts)
    if counts.shape != (len(rows), len(columns)) or not rows or not columns:
        raise ValueError(f"confusion matrix of shape {counts.shape} for {len(rows)} rows and {len(columns)} columns")
    figure = Figure(figsize=(2.8 + 0.85 * len(columns), 1.6 + 0.5 * len(rows)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    totals = counts.sum(axis=1)
    ax.set_yticks(range(len(rows)), [f"{row} (n={total:g})" for row, total in zip(rows, totals, strict=True)])
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_ylabel("true task", fontsize=9)
    ax.set_xlabel("routed to", fontsize=9)
    ax.tick_params(labelsize=8)
    size = max(5.0, min(9.0, 100 / max(len(rows), len(columns))))
    for i in range(len(rows)):
        for j in range(len(columns)):
            share = shares[i, j]
            colour = "white" if share > 0.6 else ("black" if share > 0 else "#999999")
            text = f"{100 * share:.0f}%" if totals[i] > 0 else "–"  # a task without queries has no shares
            ax.text(j, i, text, ha="center", va="center", fontsize=size, color=colour)
            if rows[i] == columns[j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#222222", linewidth=1.5))
    extra = [j for j, column in enumerate(columns) if column not in rows]
    if extra and extra == list(range(len(columns) - len(extra), len(columns))) and len(extra) < len(columns):
        ax.axvline(extra[0] - 0.5, color="#444444", linewidth=1.2, linestyle="--")  # tasks | other destinations
    ax.set_title(title, fontsize=10, fontweight="bold")
    bar = figure.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("share of the row's queries", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    save_figure(figure, out)
