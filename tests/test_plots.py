"""Tests of the confusion figures, drawn headless with the Agg backend."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from capt_lib.evaluation.plots import (  # noqa: E402
    format_pair_title,
    plot_confused_image_grid,
    plot_confusion_heatmap,
    plot_pair_counts,
    plot_pair_stability,
    save_figure,
)

CLASSNAMES = ["T-shirt", "Trouser", "Pullover"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def draw_without_glyph_warnings(fig):
    """Render the figure and fail if a label character is missing from the font."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    missing = [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert missing == []


def tick_texts(labels):
    return [label.get_text() for label in labels]


def test_heatmap_percentages():
    cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    fig = plot_confusion_heatmap(cm, CLASSNAMES)
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    assert tick_texts(ax.get_xticklabels()) == CLASSNAMES
    assert tick_texts(ax.get_yticklabels()) == CLASSNAMES
    assert ax.get_xlabel() == "Predicted class"
    assert ax.get_ylabel() == "True class"
    assert "row-normalised" in ax.get_title()
    # Row 0: 3/4 and 1/4; row 1: all correct; row 2 has no images and shows zeros.
    assert [t.get_text() for t in ax.texts] == ["75", "25", "0", "0", "100", "0", "0", "0", "0"]
    draw_without_glyph_warnings(fig)


def test_heatmap_counts_on_given_axes():
    fig, ax = plt.subplots()
    cm = np.array([[5, 2, 0], [1, 4, 0], [0, 3, 6]])
    returned = plot_confusion_heatmap(cm, CLASSNAMES, normalize=None, ax=ax, title="Test split")
    assert returned is fig
    assert ax.get_title() == "Test split"
    assert [t.get_text() for t in ax.texts] == ["5", "2", "0", "1", "4", "0", "0", "3", "6"]


def test_heatmap_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        plot_confusion_heatmap(np.eye(2), CLASSNAMES)
    with pytest.raises(ValueError, match="normalize='all'"):
        plot_confusion_heatmap(np.eye(3), CLASSNAMES, normalize="all")


def test_heatmap_annotation_off_for_many_classes():
    names = [f"class {i}" for i in range(25)]
    fig = plot_confusion_heatmap(np.eye(25, dtype=int), names)
    assert len(fig.axes[0].texts) == 0


def test_image_grid_layout():
    gray = np.full((8, 8), 200, dtype=np.uint8)
    rgb = Image.new("RGB", (8, 8), color=(10, 20, 30))
    titles = [format_pair_title("T-shirt", "Pullover", 3), format_pair_title("Trouser", "T-shirt", 1)]
    fig = plot_confused_image_grid([[gray, rgb, gray], [rgb]], titles, max_per_pair=2)
    assert len(fig.axes) == 4  # 2 pairs x min(max_per_pair, 3 images)
    first_column = [fig.axes[0], fig.axes[2]]
    assert [ax.get_ylabel() for ax in first_column] == ["T-shirt → Pullover (3)", "Trouser → T-shirt (1)"]
    assert sum(len(ax.images) for ax in fig.axes) == 3  # 2 shown in row 0, 1 in row 1
    assert "true → predicted" in fig.get_suptitle()
    draw_without_glyph_warnings(fig)


def test_image_grid_empty_pair():
    fig = plot_confused_image_grid([[], [np.zeros((4, 4, 3))]], ["a → b (0)", "c → d (1)"])
    assert [t.get_text() for t in fig.axes[0].texts] == ["no images"]


def test_image_grid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 image rows but 1 pair titles"):
        plot_confused_image_grid([[], []], ["a → b"])
    with pytest.raises(ValueError, match=r"images\[0\]\[0\] has shape \(4, 4, 2\)"):
        plot_confused_image_grid([[np.zeros((4, 4, 2))]], ["a → b"])


def test_pair_counts_bars():
    pairs = [(0, 2, 7), (1, 0, 3)]
    fig = plot_pair_counts(pairs, CLASSNAMES)
    ax = fig.axes[0]
    assert [patch.get_width() for patch in ax.patches] == [7, 3]
    assert tick_texts(ax.get_yticklabels()) == ["T-shirt → Pullover", "Trouser → T-shirt"]
    assert ax.get_xlabel() == "Misclassified images"
    assert ax.get_title()
    draw_without_glyph_warnings(fig)


def test_pair_counts_symmetric_labels():
    fig = plot_pair_counts([(0, 1, 4)], CLASSNAMES, symmetric=True)
    assert tick_texts(fig.axes[0].get_yticklabels()) == ["T-shirt ↔ Trouser"]
    draw_without_glyph_warnings(fig)


def test_pair_counts_without_pairs():
    fig = plot_pair_counts([], CLASSNAMES)
    ax = fig.axes[0]
    assert len(ax.patches) == 0
    assert [t.get_text() for t in ax.texts] == ["no confusion pairs"]


def test_pair_stability_without_pairs():
    fig = plot_pair_stability({"seed 1": [], "seed 2": []}, CLASSNAMES)
    assert [t.get_text() for t in fig.axes[0].texts] == ["no confusion pairs"]


def test_pair_stability_heatmap():
    runs = {"seed 1": [(0, 1, 5), (2, 0, 3)], "seed 2": [(0, 1, 4)], "seed 3": [(2, 0, 2), (0, 1, 1)]}
    fig = plot_pair_stability(runs, CLASSNAMES)
    ax = fig.axes[0]
    assert tick_texts(ax.get_xticklabels()) == ["seed 1", "seed 2", "seed 3"]
    assert tick_texts(ax.get_yticklabels()) == ["T-shirt → Trouser", "Pullover → T-shirt"]
    # Ranks row by row; the blank cell (pair 2 -> 0 is not in seed 2's list) has no label.
    assert [t.get_text() for t in ax.texts] == ["1", "1", "2", "2", "1"]
    assert ax.get_xlabel() == "Run"
    assert ax.get_ylabel() == "Confusion pair"


def test_save_figure_png_and_pdf(tmp_path):
    fig = plot_pair_counts([(0, 1, 2)], CLASSNAMES)
    written = save_figure(fig, tmp_path / "figures" / "pairs.png", pdf=True)
    assert written == [tmp_path / "figures" / "pairs.png", tmp_path / "figures" / "pairs.pdf"]
    assert written[0].read_bytes()[:8] == PNG_MAGIC
    assert written[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["pairs.pdf", "pairs.png"]


def test_save_figure_rejects_other_suffix(tmp_path):
    fig = plot_pair_counts([(0, 1, 2)], CLASSNAMES)
    with pytest.raises(ValueError, match="must end in .png"):
        save_figure(fig, tmp_path / "pairs.jpg")
