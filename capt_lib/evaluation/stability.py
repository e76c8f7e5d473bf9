"""Are the same confusion pairs on top across runs? Pairwise comparisons of confusion matrices."""

from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np
import pandas as pd

from capt_lib.evaluation.metrics import pair_overlap, rank_correlation_of_pairs, top_confusion_pairs


def top_pairs_by_run(matrices: Mapping[str, np.ndarray], k: int) -> dict[str, list[tuple[int, int, int]]]:
    """Return the top-``k`` unordered confusion pairs of each run's confusion matrix."""
    return {name: top_confusion_pairs(cm, k, symmetric=True) for name, cm in matrices.items()}


def pair_stability_table(matrices: Mapping[str, np.ndarray], k: int = 3) -> pd.DataFrame:
    """Compare every two runs: Jaccard overlap of their top-``k`` unordered pairs and the
    Spearman correlation of all off-diagonal counts (rows: run pairs).

    A Jaccard of 1 means both runs have the same top-``k`` pairs. A correlation near 1
    means the runs rank all class pairs alike, not only the top ones.
    """
    if len(matrices) < 2:
        raise ValueError(f"a stability check needs at least two runs, got {list(matrices)}")
    tops = top_pairs_by_run(matrices, k)

    rows = []
    for first, second in itertools.combinations(matrices, 2):
        overlap = pair_overlap(tops[first], tops[second], symmetric=True)
        rows.append(
            {
                "run_a": first,
                "run_b": second,
                f"top{k}_jaccard": overlap["jaccard"],
                "shared_pairs": len(overlap["shared"]),
                "spearman": rank_correlation_of_pairs(_symmetrised(matrices[first]), _symmetrised(matrices[second])),
            }
        )
    return pd.DataFrame(rows)


def pairs_on_top_everywhere(matrices: Mapping[str, np.ndarray], k: int = 3) -> list[tuple[int, int]]:
    """Unordered pairs that are in the top ``k`` of every run."""
    tops = top_pairs_by_run(matrices, k)
    shared = None
    for pairs in tops.values():
        current = {(min(a, b), max(a, b)) for a, b, _ in pairs}
        shared = current if shared is None else shared & current
    return sorted(shared or [])


def _symmetrised(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    return cm + cm.T
