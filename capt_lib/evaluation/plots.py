"""Figures for confusion analysis: heatmaps, confused-image grids, pair counts and pair stability.

Each plotting function draws into the ``ax`` it is given, or into a new figure, and
returns the Figure. None of them calls ``plt.show``: notebooks display the returned
figure, and scripts pass it to ``save_figure``. Labels use the pair convention of
``capt_lib.evaluation.metrics``: "a → b" is an image of class a predicted as b, and
"a ↔ b" is the unordered pair.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from capt_lib.evaluation.metrics import pair_rank_table
from capt_lib.utils.io import atomic_write

HEATMAP_NORMALIZE_OPTIONS = ("true", None)
ANNOTATE_MAX_CLASSES = 20  # above this many classes, heatmap cell labels overlap and are off by default
ORDERED_ARROW = "→"
SYMMETRIC_ARROW = "↔"


def format_pair_title(true_name: str, predicted_name: str, count: int | None = None) -> str:
    """Return the row label of a confusion pair, "a → b (count)", or "a → b" without a count."""
    title = f"{true_name} {ORDERED_ARROW} {predicted_name}"
    return title if count is None else f"{title} ({count})"


def plot_confusion_heatmap(
    cm: Any,
    classnames: Sequence[str],
    *,
    normalize: str | None = "true",
    ax: Axes | None = None,
    title: str | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Draw a confusion matrix (rows = true class, columns = predicted class) as a heatmap.

    ``normalize="true"`` shows each row as percentages of that true class (a row without
    images shows zeros); ``normalize=None`` shows raw counts. ``annotate`` writes the
    value in every cell and defaults to on for at most ``ANNOTATE_MAX_CLASSES`` classes.
    """
    matrix = np.asarray(cm)
    num_classes = len(classnames)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"cm must have shape ({num_classes}, {num_classes}) to match classnames, got {matrix.shape}")
    if normalize not in HEATMAP_NORMALIZE_OPTIONS:
        raise ValueError(f"normalize={normalize!r} is invalid; choose one of {HEATMAP_NORMALIZE_OPTIONS}")
    if annotate is None:
        annotate = num_classes <= ANNOTATE_MAX_CLASSES

    if normalize == "true":
        totals = matrix.sum(axis=1, keepdims=True)  # (C, 1)
        values = np.divide(100.0 * matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)  # (C, C)
        value_format, colorbar_label = ".0f", "% of the true class"
        default_title = "Confusion matrix (row-normalised, %)"
    else:
        values = matrix
        value_format = "d" if np.issubdtype(matrix.dtype, np.integer) else ".3g"
        colorbar_label, default_title = "images", "Confusion matrix (counts)"

    side = max(4.0, 0.45 * num_classes + 2.0)
    fig, ax = _figure_and_axes(ax, figsize=(side + 1.0, side))
    sns.heatmap(
        values,
        ax=ax,
        annot=annotate,
        fmt=value_format,
        cmap="Blues",
        square=True,
        xticklabels=list(classnames),
        yticklabels=list(classnames),
        cbar_kws={"label": colorbar_label},
    )
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title or default_title)
    ax.tick_params(axis="x", labelrotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")
    ax.tick_params(axis="y", labelrotation=0)
    return fig


def plot_confused_image_grid(
    images: Sequence[Sequence[Any]],
    pair_titles: Sequence[str],
    *,
    max_per_pair: int = 8,
    title: str | None = None,
    cell_size: float = 1.3,
) -> Figure:
    """Draw one row per confusion pair with up to ``max_per_pair`` of its confused images.

    ``images[i]`` contains the images of pair i (PIL images, or uint8 / [0, 1] float arrays
    of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)), and ``pair_titles[i]`` labels
    the row; ``format_pair_title`` builds the usual "a → b (count)" label. A pair
    without images gets a row that says so.
    """
    if len(images) != len(pair_titles):
        raise ValueError(f"got {len(images)} image rows but {len(pair_titles)} pair titles; pass one title per pair")
    if not images:
        raise ValueError("plot_confused_image_grid needs at least one pair")
    if max_per_pair < 1:
        raise ValueError(f"max_per_pair={max_per_pair} must be at least 1")

    num_rows = len(images)
    num_cols = max(1, min(max_per_pair, max(len(row) for row in images)))
    fig, axes = plt.subplots(
        num_rows,
        num_cols,
        figsize=(cell_size * num_cols + 2.5, cell_size * num_rows + 0.6),
        squeeze=False,
        layout="constrained",
    )  # axes: (num_rows, num_cols)

    for row, (row_images, row_title) in enumerate(zip(images, pair_titles)):
        shown = list(row_images)[:max_per_pair]
        for col in range(num_cols):
            ax = axes[row, col]
            _clear_frame(ax)
            if col < len(shown):
                _show_image(ax, shown[col], where=f"images[{row}][{col}]")
        axes[row, 0].set_ylabel(row_title, rotation=0, ha="right", va="center")
        if not shown:
            axes[row, 0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes[row, 0].transAxes)

    fig.suptitle(title or f"Confused images (true {ORDERED_ARROW} predicted)")
    return fig


def plot_pair_counts(
    pairs: Sequence[Sequence[Any]],
    classnames: Sequence[str],
    *,
    symmetric: bool = False,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw (a, b, count) pairs as horizontal bars, the first pair at the top.

    Pass the output of ``ConfusionBank.top_pairs`` or ``top_confusion_pairs``, with the
    same ``symmetric`` flag, so that the labels read "a ↔ b" for unordered pairs.
    """
    arrow = SYMMETRIC_ARROW if symmetric else ORDERED_ARROW
    labels = [f"{_classname(classnames, a)} {arrow} {_classname(classnames, b)}" for a, b, _ in pairs]
    counts = [count for _, _, count in pairs]

    fig, ax = _figure_and_axes(ax, figsize=(7.0, max(2.5, 0.35 * len(pairs) + 1.2)))
    positions = np.arange(len(pairs))
    ax.barh(positions, counts, color="tab:blue")
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    if not pairs:
        ax.text(0.5, 0.5, "no confusion pairs", ha="center", va="center", transform=ax.transAxes)

    ax.set_xlabel("Misclassified images")
    ax.set_ylabel("Confusion pair" + ("" if symmetric else f" (true {ORDERED_ARROW} predicted)"))
    ax.set_title(title or "Most frequent confusion pairs")
    return fig


def plot_pair_stability(
    top_pairs_by_run: Mapping[str, Sequence[Sequence[Any]]],
    classnames: Sequence[str],
    *,
    symmetric: bool = False,
    max_pairs: int = 20,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw the rank of each top pair in each run (seed or base model) as a heatmap.

    Rows are pairs, sorted as ``pair_rank_table`` sorts them, so that pairs on top in
    every run come first. At most ``max_pairs`` rows are drawn, and a blank cell means
    the pair is not in that run's list.
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs={max_pairs} must be at least 1")
    table = pair_rank_table(top_pairs_by_run, symmetric=symmetric).head(max_pairs)  # (pairs, runs)
    arrow = SYMMETRIC_ARROW if symmetric else ORDERED_ARROW
    row_labels = [f"{_classname(classnames, a)} {arrow} {_classname(classnames, b)}" for a, b in table.index]

    fig, ax = _figure_and_axes(ax, figsize=(max(4.0, 0.9 * table.shape[1] + 3.5), max(2.5, 0.4 * len(table) + 1.5)))
    if table.empty:
        ax.text(0.5, 0.5, "no confusion pairs", ha="center", va="center", transform=ax.transAxes)
    else:
        sns.heatmap(
            table.to_numpy(),
            ax=ax,
            annot=True,
            fmt=".0f",
            cmap="viridis_r",
            xticklabels=list(table.columns),
            yticklabels=row_labels,
            cbar_kws={"label": "rank (1 = most confused)"},
        )
        ax.tick_params(axis="y", labelrotation=0)
    ax.set_xlabel("Run")
    ax.set_ylabel("Confusion pair")
    ax.set_title(title or "Rank of the top confusion pairs across runs (blank: not in the run's top list)")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, pdf: bool = False, dpi: int = 150) -> list[Path]:
    """Write ``fig`` to ``path`` (a .png file) and, with ``pdf=True``, beside it as .pdf.

    Each file is written atomically. Returns the paths written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; {path} must end in .png (pass pdf=True for a PDF copy)")

    written = [atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))]
    if pdf:
        pdf_path = path.with_suffix(".pdf")
        written.append(atomic_write(pdf_path, lambda tmp: fig.savefig(tmp, format="pdf", bbox_inches="tight")))
    return written


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _classname(classnames: Sequence[str], label: int) -> str:
    if not 0 <= int(label) < len(classnames):
        raise ValueError(f"class label {label} is out of range for {len(classnames)} class names")
    return classnames[int(label)]


def _clear_frame(ax: Axes) -> None:
    """Hide ticks and spines but keep the axes, so that its y label still shows."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _show_image(ax: Axes, image: Any, where: str) -> None:
    if isinstance(image, Image.Image) and image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]  # (H, W)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"{where} has shape {array.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")

    if array.ndim == 2:
        upper = 255 if np.issubdtype(array.dtype, np.integer) else 1.0
        ax.imshow(array, cmap="gray", vmin=0, vmax=upper)
    else:
        ax.imshow(array)
