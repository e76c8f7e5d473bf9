import math

import numpy as np
import pandas as pd
import pytest

from capt_lib.evaluation.stability import (
    describe_stability,
    pair_stability_table,
    pairs_on_top_everywhere,
    summarize_stability,
)

# Two 3-class runs. Unordered pair counts, worked out by hand from cm[a, b] + cm[b, a]:
# run A: {0,1} 7, {0,2} 1, {1,2} 3, so its top 2 are {0,1} and {1,2};
# run B: {0,1} 1, {0,2} 6, {1,2} 6, so its top 2 are {0,2} and {1,2}.
RUN_A = np.array([[0, 5, 1], [2, 0, 0], [0, 3, 0]])
RUN_B = np.array([[0, 1, 4], [0, 0, 0], [2, 6, 0]])
# Ranks of the counts: A (7, 1, 3) -> (3, 1, 2), B (1, 6, 6) -> (1, 2.5, 2.5). Centred:
# (1, -1, 0) and (-1, 0.5, 0.5), so r = -1.5 / (sqrt(2) * sqrt(1.5)) = -sqrt(3) / 2.
SPEARMAN_A_B = -math.sqrt(3) / 2


def test_stability_table_by_hand():
    table = pair_stability_table({"A": RUN_A, "B": RUN_B}, k=2)

    assert list(table.columns) == ["run_a", "run_b", "top2_jaccard", "shared_pairs", "spearman"]
    assert table.loc[0, "shared_pairs"] == 1
    assert table.loc[0, "top2_jaccard"] == pytest.approx(1 / 3)
    assert table.loc[0, "spearman"] == pytest.approx(SPEARMAN_A_B)


def test_identical_runs_are_fully_stable():
    table = pair_stability_table({"A": RUN_A, "A again": RUN_A.copy()}, k=2)

    assert table.loc[0, "top2_jaccard"] == 1.0
    assert table.loc[0, "spearman"] == pytest.approx(1.0)


def test_stability_needs_two_runs():
    with pytest.raises(ValueError, match="at least two runs"):
        pair_stability_table({"A": RUN_A}, k=2)


def test_pairs_on_top_everywhere_by_hand():
    assert pairs_on_top_everywhere({"A": RUN_A, "B": RUN_B}, k=2) == [(1, 2)]
    assert pairs_on_top_everywhere({"A": RUN_A, "B": RUN_B}, k=1) == []


def test_summary_averages_each_group():
    seeds = pd.DataFrame(
        {"run_a": ["s1", "s1", "s2"], "run_b": ["s2", "s3", "s3"], "top3_jaccard": [1.0, 0.5, 0.2],
         "shared_pairs": [3, 2, 1], "spearman": [0.9, 0.6, 0.3]}
    )
    models = pd.DataFrame({"run_a": ["zs"], "run_b": ["s1"], "top3_jaccard": [0.5], "shared_pairs": [2], "spearman": [0.4]})

    summary = summarize_stability({"across seeds": seeds, "across models": models, "empty": seeds.iloc[:0]}, k=3)

    assert list(summary["comparison"]) == ["across seeds", "across models"]
    first = summary.iloc[0]
    assert first["runs_compared"] == 3
    assert first["shared_pairs_mean"] == pytest.approx(2.0)
    assert first["top3_jaccard_mean"] == pytest.approx(1.7 / 3)
    assert first["spearman_mean"] == pytest.approx(0.6)
    assert first["spearman_min"] == pytest.approx(0.3)
    assert summary.iloc[1]["spearman_min"] == pytest.approx(0.4)


def test_summary_rejects_other_k():
    table = pair_stability_table({"A": RUN_A, "B": RUN_B}, k=2)

    with pytest.raises(ValueError, match="top3_jaccard"):
        summarize_stability({"runs": table}, k=3)


def test_description_states_the_numbers():
    table = pair_stability_table({"A": RUN_A, "B": RUN_B}, k=2)
    summary = summarize_stability({"across runs": table}, k=2)

    (sentence,) = describe_stability(summary, k=2)

    assert sentence.startswith("Across runs (one comparison): 1.0 of the top 2 pairs are shared")
    assert "Jaccard 0.33" in sentence
    assert "-0.87 on average (lowest -0.87)" in sentence
