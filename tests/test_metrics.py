"""Tests of the evaluation metrics against hand-computed values and slow reference implementations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from capt_lib.evaluation.metrics import (
    accuracy,
    confusion_matrix,
    harmonic_mean,
    pair_overlap,
    pair_rank_table,
    pair_resolution,
    per_pair_table,
    rank_correlation_of_pairs,
    top_confusion_pairs,
)

# Eight test images of four classes; each line is one image's story for the pair (0, 1).
LABELS = [0, 0, 0, 1, 2, 0, 3, 3]
BASE = [1, 1, 1, 0, 2, 0, 2, 3]
TUNED = [0, 1, 2, 1, 3, 1, 3, 3]
# 0: 0->1 fixed; 1: 0->1 still confused; 2: 0->1 now wrong as 2; 3: 1->0 fixed (other direction);
# 4: right before, now wrong; 5: right before, now confused as 0->1; 6: wrong before, fixed; 7: right in both.


def test_accuracy_from_predictions():
    assert accuracy([0, 2, 2, 1], [0, 1, 2, 1]) == 75.0


def test_accuracy_from_logits():
    logits = torch.tensor([[3.0, 1.0], [0.2, 0.1], [0.0, 5.0]])  # argmax 0, 0, 1
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)


def test_accuracy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="lengths"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="integer labels"):
        accuracy(np.array([0.0, 1.0]), [0, 1])
    with pytest.raises(ValueError, match="empty"):
        accuracy(np.zeros(0, dtype=int), np.zeros(0, dtype=int))


def test_harmonic_mean_values():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(50.0, 0.0) == 0.0
    assert harmonic_mean(70.0, 70.0) == pytest.approx(70.0)


def test_harmonic_mean_rejects_negative():
    with pytest.raises(ValueError, match="novel=-1"):
        harmonic_mean(50.0, -1.0)


def test_confusion_matrix_keeps_diagonal():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 0], num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"pred labels must lie in \[0, 2\)"):
        confusion_matrix([0, 1], [0, 2], num_classes=2)


def test_top_pairs_ignore_diagonal():
    cm = np.array([[9, 1, 3], [3, 8, 0], [0, 2, 7]])
    assert top_confusion_pairs(cm, 3) == [(0, 2, 3), (1, 0, 3), (2, 1, 2)]
    # {0, 1}: 1 + 3 = 4; {0, 2}: 3 + 0 = 3; {1, 2}: 0 + 2 = 2
    assert top_confusion_pairs(cm, None, symmetric=True) == [(0, 1, 4), (0, 2, 3), (1, 2, 2)]


def test_pair_overlap_ordered():
    overlap = pair_overlap([(0, 1, 5), (2, 3, 4), (1, 0, 2)], [(0, 1), (3, 2)])
    assert overlap["shared"] == [(0, 1)]
    assert overlap["only_a"] == [(1, 0), (2, 3)]
    assert overlap["only_b"] == [(3, 2)]
    assert overlap["jaccard"] == pytest.approx(1 / 4)


def test_pair_overlap_symmetric():
    overlap = pair_overlap([(0, 1, 5), (2, 3, 4), (1, 0, 2)], [(0, 1), (3, 2)], symmetric=True)
    assert overlap["shared"] == [(0, 1), (2, 3)]
    assert overlap["jaccard"] == 1.0


def test_pair_overlap_empty_lists():
    assert pair_overlap([], [])["jaccard"] == 1.0


def off_diagonal_matrix(values):
    """Place six values on the off-diagonal cells of a 3x3 matrix, in row-major order."""
    matrix = np.full((3, 3), 100)  # a large diagonal must not influence the result
    matrix[~np.eye(3, dtype=bool)] = values
    return matrix


def test_rank_correlation_hand_example():
    cm_a = off_diagonal_matrix([1, 2, 3, 4, 5, 6])
    cm_b = off_diagonal_matrix([1, 3, 2, 4, 5, 6])
    # Spearman: one swap, sum d^2 = 2, rho = 1 - 6 * 2 / (6 * 35)
    assert rank_correlation_of_pairs(cm_a, cm_b) == pytest.approx(1 - 12 / 210)
    # Kendall: 15 pairs, 1 discordant, tau = (14 - 1) / 15
    assert rank_correlation_of_pairs(cm_a, cm_b, method="kendall") == pytest.approx(13 / 15)
    reversed_b = off_diagonal_matrix([6, 5, 4, 3, 2, 1])
    assert rank_correlation_of_pairs(cm_a, reversed_b) == pytest.approx(-1.0)
    assert rank_correlation_of_pairs(cm_a, reversed_b, method="kendall") == pytest.approx(-1.0)


def slow_average_ranks(values):
    return np.array([1 + np.sum(values < v) + (np.sum(values == v) - 1) / 2 for v in values])


def slow_kendall_tau_b(x, y):
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        tied_x += dx == 0
        tied_y += dy == 0
        concordant += dx * dy > 0
        discordant += dx * dy < 0
    total = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((total - tied_x) * (total - tied_y))


def test_rank_correlation_with_ties_matches_slow_version():
    rng = np.random.default_rng(3)
    cm_a = rng.integers(0, 4, size=(9, 9))  # many ties, as in real confusion matrices
    cm_b = rng.integers(0, 3, size=(9, 9))
    x = cm_a[~np.eye(9, dtype=bool)]
    y = cm_b[~np.eye(9, dtype=bool)]
    expected_spearman = np.corrcoef(slow_average_ranks(x), slow_average_ranks(y))[0, 1]
    assert rank_correlation_of_pairs(cm_a, cm_b) == pytest.approx(expected_spearman)
    assert rank_correlation_of_pairs(cm_a, cm_b, method="kendall") == pytest.approx(slow_kendall_tau_b(x, y))


def test_rank_correlation_constant_is_nan():
    assert math.isnan(rank_correlation_of_pairs(np.eye(3), np.ones((3, 3))))
    assert math.isnan(rank_correlation_of_pairs(np.eye(3), np.ones((3, 3)), method="kendall"))


def test_rank_correlation_rejects_bad_inputs():
    with pytest.raises(ValueError, match="method='pearson'"):
        rank_correlation_of_pairs(np.eye(3), np.eye(3), method="pearson")
    with pytest.raises(ValueError, match="one shape"):
        rank_correlation_of_pairs(np.eye(3), np.eye(4))


def test_pair_resolution_ordered():
    result = pair_resolution(BASE, TUNED, LABELS, [(0, 1, 3)])
    assert result["num_images"] == 8
    assert result["base_errors_in_pairs"] == 3  # images 0, 1, 2
    assert result["resolved"] == 1
    assert result["still_confused"] == 1
    assert result["wrong_elsewhere"] == 1
    assert result["pair_resolution_rate"] == pytest.approx(100 / 3)
    assert result["newly_confused_in_pairs"] == 1  # image 5
    assert result["newly_wrong"] == 2  # images 4, 5
    assert result["newly_right"] == 3  # images 0, 3, 6
    assert result["base_accuracy"] == 37.5  # images 4, 5, 7
    assert result["tuned_accuracy"] == 50.0  # images 0, 3, 6, 7


def test_pair_resolution_symmetric():
    result = pair_resolution(BASE, TUNED, LABELS, [(1, 0)], symmetric=True)
    assert result["base_errors_in_pairs"] == 4  # images 0, 1, 2, 3
    assert result["resolved"] == 2  # images 0, 3
    assert result["still_confused"] == 1
    assert result["wrong_elsewhere"] == 1
    assert result["pair_resolution_rate"] == 50.0
    assert result["newly_confused_in_pairs"] == 1


def test_pair_resolution_without_pair_errors():
    result = pair_resolution(BASE, TUNED, LABELS, [(3, 0)])
    assert result["base_errors_in_pairs"] == 0
    assert math.isnan(result["pair_resolution_rate"])


def test_pair_resolution_rejects_bad_pairs():
    with pytest.raises(ValueError, match="two different"):
        pair_resolution(BASE, TUNED, LABELS, [(2, 2)])
    with pytest.raises(ValueError, match="lengths"):
        pair_resolution(BASE[:-1], TUNED, LABELS, [(0, 1)])


def test_per_pair_table_counts():
    table = per_pair_table(BASE, TUNED, LABELS, [(0, 1), (2, 3), (0, 1)], classnames=["a", "b", "c", "d"])
    assert list(table.columns) == [
        "class_a", "class_b", "name_a", "name_b", "base_errors", "resolved",
        "still_confused", "wrong_elsewhere", "newly_confused", "resolution_rate",
    ]
    assert len(table) == 2  # the repeated (0, 1) is dropped
    first, second = table.iloc[0], table.iloc[1]
    assert (first["name_a"], first["name_b"]) == ("a", "b")
    assert [first[c] for c in ("base_errors", "resolved", "still_confused", "wrong_elsewhere")] == [3, 1, 1, 1]
    assert first["newly_confused"] == 1
    assert first["resolution_rate"] == pytest.approx(100 / 3)
    # The base model predicted no image of class 2 as 3. The tuned model predicts image 4 as 3.
    assert second["base_errors"] == 0
    assert second["newly_confused"] == 1
    assert math.isnan(second["resolution_rate"])


def test_pair_rank_table_order():
    table = pair_rank_table(
        {"seed1": [(0, 1, 9), (2, 3, 4), (4, 5, 1)], "seed2": [(2, 3), (0, 1), (6, 7)], "seed3": [(0, 1)]}
    )
    # (0, 1) is in all three runs and (2, 3) in two. (4, 5) and (6, 7) are in one run each,
    # both with rank 3, so the tie goes to the smaller pair.
    assert list(table.index) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert list(table.columns) == ["seed1", "seed2", "seed3"]
    assert table.loc[(0, 1)].tolist() == [1.0, 2.0, 1.0]
    assert table.loc[(2, 3), "seed1"] == 2.0
    assert pd.isna(table.loc[(2, 3), "seed3"])


def test_pair_rank_table_empty_runs():
    table = pair_rank_table({"seed1": [], "seed2": []})
    assert table.empty
    assert list(table.columns) == ["seed1", "seed2"]
