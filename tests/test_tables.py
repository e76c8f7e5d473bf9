"""Result tables over seeds, checked against numbers worked out by hand.

Run folders are written directly (run.json and results.json), so no notebook runs here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from capt_lib.evaluation.paper_results import (
    AVERAGE,
    BASE_TO_NOVEL_DATASETS,
    PUBLISHED_BASE_TO_NOVEL,
    paper_base_to_novel,
    published_methods,
)
from capt_lib.evaluation.tables import (
    base_to_novel_table,
    collect_results,
    compare_with_paper,
    cross_dataset_table,
    domain_generalization_table,
    few_shot_table,
    read_results,
    to_markdown,
    write_results,
)
from capt_lib.utils.io import atomic_write_json

NOTEBOOK = "02_capt.ipynb"


def add_run(runs: Path, dataset: str, seed: int, metrics: dict | None, *, status: str = "ok",
            settings: dict | None = None, variant: str = "", shots: int | None = None) -> Path:
    """Write one run folder as papermill_runner and a notebook would leave it."""
    run_dir = runs / variant / "02_capt" / dataset / f"seed{seed}" if variant else runs / "02_capt" / dataset / f"seed{seed}"
    parameters = {"dataset": dataset, "seed": seed, "output_dir": str(run_dir)}
    error = {"ename": "RuntimeError", "evalue": "out of memory"} if status == "failed" else None
    atomic_write_json(run_dir / "run.json", {"status": status, "parameters": parameters, "error": error})
    if metrics is not None:
        full_settings = {"dataset": dataset, "seed": seed, "train": {"lr": 0.002, "seed": seed},
                         "provenance": {"git_revision": f"rev{seed}"}, **(settings or {})}
        if shots is not None:
            full_settings["shots"] = shots
        write_results(run_dir, full_settings, metrics)
    return run_dir


def b2n(base: float, novel: float) -> dict:
    return {"base_accuracy": base, "novel_accuracy": novel}


@pytest.fixture
def three_seed_runs(tmp_path):
    """Dataset d1: base 80, 90, 70 and novel 60, 90, 30 over seeds 1, 2, 3."""
    runs = tmp_path / "runs"
    for seed, base, novel in ((1, 80.0, 60.0), (2, 90.0, 90.0), (3, 70.0, 30.0)):
        add_run(runs, "d1", seed, b2n(base, novel))
    return runs


def test_results_round_trip(tmp_path):
    path = write_results(tmp_path, {"dataset": "d1"}, {"accuracy": 71.5, "target_accuracy": {"dtd": 40.0}})

    assert path == tmp_path / "results.json"
    assert read_results(path) == {"settings": {"dataset": "d1"}, "metrics": {"accuracy": 71.5, "target_accuracy": {"dtd": 40.0}}}


def test_results_shape_is_checked(tmp_path):
    with pytest.raises(ValueError, match="metric 'accuracy' must be a number"):
        write_results(tmp_path, {}, {"accuracy": "high"})
    with pytest.raises(ValueError, match="metric 'target_accuracy/dtd' must be a number"):
        write_results(tmp_path, {}, {"target_accuracy": {"dtd": True}})

    (tmp_path / "results.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match=r"results.json: a results file must be an object with exactly the keys"):
        read_results(tmp_path / "results.json")


def test_collect_results_rows(tmp_path):
    runs = tmp_path / "runs"
    add_run(runs, "d1", 1, {"accuracy": 70.0, "target_accuracy": {"dtd": 40.0}})
    add_run(runs, "d1", 2, None, status="failed")
    add_run(runs, "d1", 3, None)  # finished ok but wrote no results.json
    add_run(runs, "d2", 1, {"accuracy": 50.0}, variant="shots-4", shots=4)

    table = collect_results(runs, NOTEBOOK)

    assert list(zip(table["variant"], table["dataset"], table["seed"])) == [("", "d1", 1), ("", "d1", 2), ("", "d1", 3), ("shots-4", "d2", 1)]
    assert list(table["status"]) == ["ok", "failed", "ok", "ok"]
    assert table.loc[0, "accuracy"] == 70.0
    assert table.loc[0, "target_accuracy/dtd"] == 40.0
    assert table.loc[1, "error"] == "run status 'failed': RuntimeError: out of memory"
    assert table.loc[2, "error"] == "the run finished ok but wrote no results.json"
    assert math.isnan(table.loc[2, "accuracy"])
    assert table.loc[3, "shots"] == 4


def test_collect_results_rejects_mismatched_seed(tmp_path):
    run_dir = add_run(tmp_path / "runs", "d1", 1, {"accuracy": 1.0})
    write_results(run_dir, {"dataset": "d1", "seed": 2}, {"accuracy": 1.0})

    with pytest.raises(ValueError, match="settings have seed=2 but the run was started with seed=1"):
        collect_results(tmp_path / "runs", NOTEBOOK)


def test_hm_uses_mean_accuracies(three_seed_runs):
    table = base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK), datasets=["d1"])
    row = table.loc["d1"]

    # Means: base (80 + 90 + 70) / 3 = 80, novel (60 + 90 + 30) / 3 = 60, so HM = 2 * 80 * 60 / 140.
    # The per-seed HMs are 68.571, 90 and 42, and their mean 66.857 is not the table's HM.
    assert row["base"] == pytest.approx(80.0)
    assert row["novel"] == pytest.approx(60.0)
    assert row["hm"] == pytest.approx(9600.0 / 140.0)
    assert row["hm"] != pytest.approx((9600.0 / 140.0 + 90.0 + 42.0) / 3.0)
    assert row["base_std"] == pytest.approx(10.0)  # sample std of 80, 90, 70
    assert row["novel_std"] == pytest.approx(30.0)  # sample std of 60, 90, 30
    assert row["seeds"] == "1, 2, 3"
    assert row["status"] == "ok"


def test_missing_seed_is_incomplete(tmp_path):
    runs = tmp_path / "runs"
    add_run(runs, "d1", 1, b2n(80.0, 60.0))
    add_run(runs, "d1", 3, b2n(70.0, 30.0))

    row = base_to_novel_table(collect_results(runs, NOTEBOOK), datasets=["d1"]).loc["d1"]

    assert row["status"] == "incomplete (seeds 1, 3 of 1, 2, 3)"
    assert math.isnan(row["base"])
    assert math.isnan(row["hm"])


def test_failed_seed_is_incomplete(three_seed_runs):
    add_run(three_seed_runs, "d1", 2, None, status="failed")  # replaces seed 2's record

    row = base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK), datasets=["d1"]).loc["d1"]

    assert row["status"] == "incomplete (seeds 1, 3 of 1, 2, 3)"


def test_dataset_without_runs(three_seed_runs):
    table = base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK), datasets=["d1", "d2"])

    assert table.loc["d2", "status"] == "not run yet"
    assert table.loc[AVERAGE, "status"] == "incomplete (1 of 2 datasets complete)"
    assert math.isnan(table.loc[AVERAGE, "base"])


def test_only_failed_runs_is_incomplete(tmp_path):
    add_run(tmp_path / "runs", "d1", 1, None, status="failed")

    table = base_to_novel_table(collect_results(tmp_path / "runs", NOTEBOOK), datasets=["d1"])

    assert table.loc["d1", "status"] == "incomplete (no seed of 1, 2, 3 finished)"


def test_average_row_over_datasets(three_seed_runs):
    for seed in (1, 2, 3):
        add_run(three_seed_runs, "d2", seed, b2n(90.0, 70.0))

    table = base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK), datasets=["d1", "d2"])

    # d1: base 80, novel 60; d2: base 90, novel 70. Averages 85 and 65, HM = 2 * 85 * 65 / 150.
    assert list(table.index) == ["d1", "d2", AVERAGE]
    assert table.loc[AVERAGE, "base"] == pytest.approx(85.0)
    assert table.loc[AVERAGE, "novel"] == pytest.approx(65.0)
    assert table.loc[AVERAGE, "hm"] == pytest.approx(11050.0 / 150.0)
    assert table.loc[AVERAGE, "status"] == "ok"


def test_different_settings_are_rejected(three_seed_runs):
    add_run(three_seed_runs, "d1", 2, b2n(90.0, 90.0), settings={"train": {"lr": 0.01, "seed": 2}})

    with pytest.raises(ValueError, match=r"d1: the runs to average differ in settings \['train.lr'\]"):
        base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK), datasets=["d1"])


def test_two_runs_of_one_seed_are_rejected(three_seed_runs):
    add_run(three_seed_runs, "d1", 1, b2n(80.0, 60.0), variant="shots-4")

    with pytest.raises(ValueError, match=r"d1: seed\(s\) \[1\] have several runs"):
        base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK), datasets=["d1"])


def test_default_datasets_are_the_papers(three_seed_runs):
    table = base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK))

    assert list(table.index) == list(BASE_TO_NOVEL_DATASETS) + ["d1", AVERAGE]
    assert table.loc["imagenet", "status"] == "not run yet"


def test_compare_with_paper_differences(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        add_run(runs, "imagenet", seed, b2n(81.51, 74.13))

    comparison = compare_with_paper(base_to_novel_table(collect_results(runs, NOTEBOOK), datasets=["imagenet", "d9"]))

    # CAPT's ImageNet row is 80.51 / 75.13 / 77.73.
    assert comparison.loc["imagenet", "paper_base"] == 80.51
    assert comparison.loc["imagenet", "base_diff"] == pytest.approx(1.0)
    assert comparison.loc["imagenet", "novel_diff"] == pytest.approx(-1.0)
    assert comparison.loc["imagenet", "hm_diff"] == pytest.approx(2 * 81.51 * 74.13 / (81.51 + 74.13) - 77.73)
    assert math.isnan(comparison.loc["d9", "paper_base"])
    assert math.isnan(comparison.loc[AVERAGE, "paper_base"])  # the table does not cover the published datasets


def test_compare_average_with_matching_datasets(three_seed_runs):
    for seed in (1, 2, 3):
        add_run(three_seed_runs, "d2", seed, b2n(90.0, 70.0))
    table = base_to_novel_table(collect_results(three_seed_runs, NOTEBOOK), datasets=["d1", "d2"])
    paper = pd.DataFrame({"base": [80.0, 88.0, 84.0], "novel": [60.0, 70.0, 65.0], "hm": [68.0, 78.0, 73.0]},
                         index=pd.Index(["d1", "d2", AVERAGE], name="dataset"))

    comparison = compare_with_paper(table, paper)

    assert comparison.loc[AVERAGE, "base_diff"] == pytest.approx(1.0)  # 85 - 84
    assert comparison.loc["d2", "base_diff"] == pytest.approx(2.0)  # 90 - 88
    assert comparison.loc[AVERAGE, "hm_diff"] == pytest.approx(11050.0 / 150.0 - 73.0)


def test_few_shot_table(tmp_path):
    runs = tmp_path / "runs"
    for seed, accuracy in ((1, 50.0), (2, 52.0), (3, 54.0)):
        add_run(runs, "d1", seed, {"accuracy": accuracy}, variant="shots-1", shots=1)
    for seed in (1, 2):
        add_run(runs, "d1", seed, {"accuracy": 60.0}, variant="shots-2", shots=2)

    table = few_shot_table(collect_results(runs, NOTEBOOK), shots=[1, 2], datasets=["d1"])

    assert table.loc[("d1", 1), "accuracy"] == pytest.approx(52.0)
    assert table.loc[("d1", 1), "accuracy_std"] == pytest.approx(2.0)
    assert table.loc[(AVERAGE, 1), "accuracy"] == pytest.approx(52.0)
    assert table.loc[("d1", 2), "status"] == "incomplete (seeds 1, 2 of 1, 2, 3)"
    assert table.loc[(AVERAGE, 2), "status"] == "incomplete (0 of 1 datasets complete)"


def test_cross_dataset_table(tmp_path):
    runs = tmp_path / "runs"
    for seed, (source, caltech, dtd) in enumerate(((70.0, 90.0, 40.0), (71.0, 91.0, 44.0), (72.0, 92.0, 42.0)), start=1):
        add_run(runs, "imagenet", seed, {"accuracy": source, "target_accuracy": {"caltech101": caltech, "dtd": dtd}})

    table = cross_dataset_table(collect_results(runs, NOTEBOOK), targets=["caltech101", "dtd", "eurosat"])

    assert list(table.index) == ["imagenet", "caltech101", "dtd", "eurosat", AVERAGE]
    assert table.loc["imagenet", "accuracy"] == pytest.approx(71.0)
    assert table.loc["caltech101", "accuracy"] == pytest.approx(91.0)
    assert table.loc["dtd", "accuracy_std"] == pytest.approx(2.0)
    assert table.loc["eurosat", "status"] == "incomplete (no seed of 1, 2, 3 finished)"
    assert table.loc[AVERAGE, "status"] == "incomplete (2 of 3 targets complete)"

    table = cross_dataset_table(collect_results(runs, NOTEBOOK), targets=["caltech101", "dtd"])
    assert table.loc[AVERAGE, "accuracy"] == pytest.approx((91.0 + 42.0) / 2)


def test_domain_generalization_without_runs(tmp_path):
    table = domain_generalization_table(collect_results(tmp_path / "runs", NOTEBOOK))

    assert list(table.index) == ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r", AVERAGE]
    assert set(table["status"][:-1]) == {"not run yet"}


def test_to_markdown():
    table = pd.DataFrame({"base": [80.0, float("nan")], "status": ["ok", "a|b"]}, index=pd.Index(["d1", "d2"], name="dataset"))

    assert to_markdown(table, decimals=1) == (
        "| dataset | base | status |\n"
        "|:---|---:|:---|\n"
        "| d1 | 80.0 | ok |\n"
        "| d2 | - | a\\|b |\n"
    )


def test_paper_rows_are_consistent():
    capt = paper_base_to_novel("CAPT")
    datasets = capt.drop(index=AVERAGE)

    assert list(datasets.index) == list(BASE_TO_NOVEL_DATASETS)
    for row in PUBLISHED_BASE_TO_NOVEL:
        if row.method != "CAPT" or row.dataset != AVERAGE:
            assert row.hm == pytest.approx(2 * row.base * row.novel / (row.base + row.novel), abs=0.006)
    assert datasets["base"].mean() == pytest.approx(capt.loc[AVERAGE, "base"], abs=0.005)
    # The printed novel average (80.90) is not the mean of the printed rows (80.727).
    assert datasets["novel"].mean() == pytest.approx(80.727, abs=0.001)
    assert capt.loc[AVERAGE, "novel"] == 80.90


def test_paper_baselines():
    assert published_methods() == ["CAPT", "CoOp", "MaPLe", "PromptKD"]
    assert paper_base_to_novel("CoOp").loc[AVERAGE, ["base", "novel", "hm"]].tolist() == [82.69, 63.22, 71.66]
    with pytest.raises(ValueError, match="no published base-to-novel numbers for method 'CLIP'"):
        paper_base_to_novel("CLIP")
