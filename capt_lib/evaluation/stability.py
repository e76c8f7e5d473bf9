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


def summarize_stability(tables: Mapping[str, pd.DataFrame], k: int = 3) -> pd.DataFrame:
    """Average each group of comparisons made by ``pair_stability_table`` (rows: groups).

    ``tables`` maps a group name, such as "across few-shot seeds", to the rows of
    ``pair_stability_table(..., k)`` that belong to it. An empty group is left out.
    """
    jaccard = f"top{k}_jaccard"
    rows = []
    for group, table in tables.items():
        if table.empty:
            continue
        if jaccard not in table:
            raise ValueError(f"the table of group {group!r} has no column {jaccard!r}; was it built with k={k}?")
        rows.append(
            {
                "comparison": group,
                "runs_compared": len(table),
                "shared_pairs_mean": float(table["shared_pairs"].mean()),
                f"{jaccard}_mean": float(table[jaccard].mean()),
                "spearman_mean": float(table["spearman"].mean()),
                "spearman_min": float(table["spearman"].min()),
            }
        )
    return pd.DataFrame(rows)


def describe_stability(summary: pd.DataFrame, k: int = 3) -> list[str]:
    """Write one sentence per row of ``summarize_stability``'s table, with its numbers."""
    sentences = []
    for row in summary.to_dict(orient="records"):
        runs = "one comparison" if row["runs_compared"] == 1 else f"{row['runs_compared']} comparisons"
        sentences.append(
            f"{row['comparison'].capitalize()} ({runs}): {row['shared_pairs_mean']:.1f} of the top {k} "
            f"pairs are shared on average (Jaccard {row[f'top{k}_jaccard_mean']:.2f}), and the Spearman "
            f"correlation of all pair counts is {row['spearman_mean']:.2f} on average "
            f"(lowest {row['spearman_min']:.2f})."
        )
    return sentences
