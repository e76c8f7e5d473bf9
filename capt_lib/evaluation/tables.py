"""Result tables over seeds: base-to-novel, few-shot, cross-dataset and domain generalisation.

Every notebook run stores its numbers in ``results.json`` in its run folder
(``write_results``), in this shape::

    {"settings": {...full settings of the run...}, "metrics": {"base_accuracy": 81.2, ...}}

``settings`` are what ``capt_lib.runs.presets.resolve_run_settings`` returns, or any
mapping that contains everything the run depends on. ``metrics`` maps names to numbers
(accuracies in percent), or to a mapping of names to numbers for per-target results.
The tables read these metric names:

- ``base_accuracy`` and ``novel_accuracy``: base-to-novel runs (a stored ``hm`` is
  ignored, because the table recomputes HM from the means);
- ``accuracy``: few-shot runs, and the training dataset of transfer runs;
- ``target_accuracy``: ``{dataset: accuracy}`` of the datasets a transfer run tests
  without training (cross-dataset and domain generalisation).

``collect_results`` reads the runs of one notebook into a DataFrame, one row per run,
with nested metrics flattened to ``target_accuracy/<dataset>``. The table builders then
follow four rules:

- mean and sample standard deviation (ddof=1) over the expected seeds, and the
  base-to-novel HM = 2BN / (B + N) of the mean base and mean novel accuracies;
- a group without every expected seed finished ok is marked
  "incomplete (seeds 1, 3 of 1, 2, 3)" and gets no mean, and a dataset with no run at
  all is marked "not run yet";
- the runs averaged together must have equal settings apart from the seed and the
  provenance, otherwise ValueError names the keys that differ;
- the ``average`` row over datasets exists only when every dataset is complete.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from capt_lib.evaluation.metrics import harmonic_mean
from capt_lib.evaluation.paper_results import (
    AVERAGE,
    BASE_TO_NOVEL_DATASETS,
    CROSS_DATASET_SOURCE,
    CROSS_DATASET_TARGETS,
    DOMAIN_GENERALIZATION_TARGETS,
    paper_base_to_novel,
)
from capt_lib.utils.io import atomic_write_json, read_json

RESULTS_FILE = "results.json"
RUN_RECORD_FILE = "run.json"  # written by capt_lib.runs.papermill_runner
EXPECTED_SEEDS = (1, 2, 3)
FEW_SHOT_SHOTS = (1, 2, 4, 8, 16)
STATUS_COMPLETE = "ok"
STATUS_NOT_RUN = "not run yet"
METRIC_SEPARATOR = "/"  # joins a nested metric's names: target_accuracy/caltech101
# Settings that may differ between runs averaged together: the seed (also copied into
# train.seed), the run folder, and the provenance (code revision, preset paths).
IGNORED_SETTINGS = ("seed", "train.seed", "output_dir", "provenance")
RUN_COLUMNS = ["notebook", "variant", "dataset", "seed", "shots", "status", "run_dir", "error", "settings", "parameters"]
NAN = float("nan")


def write_results(output_dir: str | os.PathLike, settings: Mapping[str, Any], metrics: Mapping[str, Any]) -> Path:
    """Validate and write ``<output_dir>/results.json`` atomically; return its path."""
    path = Path(output_dir) / RESULTS_FILE
    results = {"settings": dict(settings), "metrics": dict(metrics)}
    _check_results(results, path)
    return atomic_write_json(path, results)


def read_results(path: str | os.PathLike) -> dict:
    """Read and validate a results.json, raising FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    results = read_json(path)
    _check_results(results, path)
    return results


def collect_results(runs_dir: str | os.PathLike, notebook: str | os.PathLike) -> pd.DataFrame:
    """Return one row per run of ``notebook`` under ``runs_dir``, with its status and metrics.

    Runs are found at ``<runs_dir>/<stem>/<dataset>/seed<seed>/run.json`` and, for grid
    sweeps, ``<runs_dir>/<variant>/<stem>/...``. Columns: ``notebook``, ``variant`` (""
    outside a grid), ``dataset``, ``seed``, ``shots`` (from the settings, else the
    parameters, else None), ``status`` (run.json's "ok", "failed" or "running"),
    ``run_dir``, ``error`` (why a run has no metrics), ``settings``, ``parameters``, then
    one column per metric. Runs that are not ok, or ok without a results.json, have no
    metrics and an ``error``.
    """
    runs_dir = Path(runs_dir)
    stem = Path(notebook).stem
    record_paths = sorted(runs_dir.glob(f"{stem}/*/seed*/{RUN_RECORD_FILE}"))
    record_paths += sorted(runs_dir.glob(f"*/{stem}/*/seed*/{RUN_RECORD_FILE}"))

    rows = [_run_row(path, runs_dir, stem) for path in record_paths]
    table = pd.DataFrame(rows)
    metric_columns = sorted(set(table.columns) - set(RUN_COLUMNS)) if rows else []
    table = table.reindex(columns=RUN_COLUMNS + metric_columns)
    return table.sort_values(["variant", "dataset", "seed"], kind="stable", ignore_index=True)


def base_to_novel_table(
    df: pd.DataFrame,
    expected_seeds: Sequence[int] = EXPECTED_SEEDS,
    datasets: Sequence[str] | None = None,
    *,
    ignored_settings: Sequence[str] = IGNORED_SETTINGS,
) -> pd.DataFrame:
    """Summarise base-to-novel runs per dataset: mean and std of base and novel, HM of the means.

    ``datasets`` defaults to the eleven of CAPT's published table, then the other datasets in ``df``.
    Returns a table indexed by dataset, then ``average``, with the columns ``seeds``
    (seeds finished ok), ``base``, ``base_std``, ``novel``, ``novel_std``, ``hm`` and
    ``status``. Raises ValueError when the runs of one dataset differ in settings other
    than ``ignored_settings`` or a dataset has two runs for one seed.
    """
    expected_seeds = _seed_tuple(expected_seeds)
    datasets = _table_datasets(df, datasets, BASE_TO_NOVEL_DATASETS)
    rows = {}
    for dataset in datasets:
        group = _group_rows(df, dataset=dataset)
        rows[dataset] = _base_to_novel_row(group, dataset, expected_seeds, ignored_settings)

    table = pd.DataFrame.from_dict(rows, orient="index")
    complete = table[table["status"] == STATUS_COMPLETE]
    average = {"seeds": "", "base": NAN, "base_std": NAN, "novel": NAN, "novel_std": NAN, "hm": NAN}
    if len(complete) == len(table):
        base, novel = float(complete["base"].mean()), float(complete["novel"].mean())
        average.update(base=base, novel=novel, hm=harmonic_mean(base, novel), status=STATUS_COMPLETE)
    else:
        average["status"] = f"incomplete ({len(complete)} of {len(table)} datasets complete)"
    table.loc[AVERAGE] = average
    table.index.name = "dataset"
    return table


def compare_with_paper(table: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Put a ``base_to_novel_table`` beside published numbers, with the difference ours - paper.

    ``paper`` defaults to CAPT's published table (``paper_base_to_novel("CAPT")``). A
    dataset without a published row gets NaN paper values. The ``average`` row is compared only
    when the table covers exactly the published datasets, because an average over other
    datasets is a different quantity.
    """
    paper = paper_base_to_novel("CAPT") if paper is None else paper
    datasets = [name for name in table.index if name != AVERAGE]
    paper_datasets = [name for name in paper.index if name != AVERAGE]
    comparable = set(datasets) == set(paper_datasets) or not paper_datasets

    rows = {}
    for name in table.index:
        ours = table.loc[name]
        published = paper.loc[name] if name in paper.index and (name != AVERAGE or comparable) else None
        row = {}
        for metric in ("base", "novel", "hm"):
            paper_value = float(published[metric]) if published is not None else NAN
            row[metric] = float(ours[metric])
            row[f"paper_{metric}"] = paper_value
            row[f"{metric}_diff"] = row[metric] - paper_value
        row["status"] = ours["status"]
        rows[name] = row
    comparison = pd.DataFrame.from_dict(rows, orient="index")
    comparison.index.name = "dataset"
    return comparison


def few_shot_table(
    df: pd.DataFrame,
    shots: Sequence[int] = FEW_SHOT_SHOTS,
    expected_seeds: Sequence[int] = EXPECTED_SEEDS,
    datasets: Sequence[str] | None = None,
    *,
    ignored_settings: Sequence[str] = IGNORED_SETTINGS,
) -> pd.DataFrame:
    """Summarise few-shot runs per dataset and shot count: mean and std of ``accuracy``.

    Returns a table indexed by (dataset, shots), with ``average`` rows per shot count,
    and the columns ``seeds``, ``accuracy``, ``accuracy_std`` and ``status``.
    """
    expected_seeds = _seed_tuple(expected_seeds)
    datasets = _table_datasets(df, datasets, BASE_TO_NOVEL_DATASETS)
    unknown_shots = [] if df.empty else sorted(df[df["shots"].isna() & df["dataset"].isin(datasets)]["run_dir"])
    if unknown_shots:
        raise ValueError(f"few_shot_table: runs {unknown_shots} record no shot count in settings or parameters")
    rows = {}
    for count in shots:
        for dataset in datasets:
            group = _group_rows(df, dataset=dataset, shots=count)
            rows[(dataset, count)] = _accuracy_row(group, "accuracy", f"{dataset}, {count} shots", expected_seeds, ignored_settings)
        rows[(AVERAGE, count)] = _average_row([rows[(dataset, count)] for dataset in datasets], "datasets")

    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["dataset", "shots"])
    return table


def cross_dataset_table(
    df: pd.DataFrame,
    expected_seeds: Sequence[int] = EXPECTED_SEEDS,
    *,
    source: str = CROSS_DATASET_SOURCE,
    targets: Sequence[str] = CROSS_DATASET_TARGETS,
    ignored_settings: Sequence[str] = IGNORED_SETTINGS,
) -> pd.DataFrame:
    """Summarise cross-dataset transfer: the training dataset, then each target, then their average.

    Reads the runs with ``dataset == source``: ``accuracy`` for the source row and
    ``target_accuracy/<target>`` for each target. Columns: ``seeds``, ``accuracy``,
    ``accuracy_std`` and ``status``. The average covers the targets only.
    """
    return _transfer_table(df, source, targets, _seed_tuple(expected_seeds), ignored_settings)


def domain_generalization_table(
    df: pd.DataFrame,
    expected_seeds: Sequence[int] = EXPECTED_SEEDS,
    *,
    source: str = CROSS_DATASET_SOURCE,
    targets: Sequence[str] = DOMAIN_GENERALIZATION_TARGETS,
    ignored_settings: Sequence[str] = IGNORED_SETTINGS,
) -> pd.DataFrame:
    """Summarise domain generalisation from ImageNet to its four variants; same layout as ``cross_dataset_table``."""
    return _transfer_table(df, source, targets, _seed_tuple(expected_seeds), ignored_settings)


def to_markdown(df: pd.DataFrame, decimals: int = 2, index: bool = True) -> str:
    """Render ``df`` as a GitHub-flavoured Markdown table, with NaN shown as "-".

    Written here because pandas' own ``to_markdown`` needs tabulate, which capt does not
    depend on. Floats get ``decimals`` decimals, and "|" inside a cell is escaped.
    """
    frame = df.reset_index() if index else df
    header = [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(_alignment(frame[column]) for column in frame.columns) + "|"]
    for _, row in frame.iterrows():
        cells = [_format_cell(value, decimals) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_results(results: Any, path: Path) -> None:
    if not isinstance(results, dict) or set(results) != {"settings", "metrics"}:
        keys = sorted(results) if isinstance(results, dict) else type(results).__name__
        raise ValueError(f"{path}: a results file must be an object with exactly the keys 'metrics' and 'settings', got {keys}")
    if not isinstance(results["settings"], dict):
        raise ValueError(f"{path}: 'settings' must be an object, got {type(results['settings']).__name__}")
    if not isinstance(results["metrics"], dict):
        raise ValueError(f"{path}: 'metrics' must be an object, got {type(results['metrics']).__name__}")
    for name, value in results["metrics"].items():
        values = value.items() if isinstance(value, dict) else [(None, value)]
        for inner, number in values:
            if not _is_number(number):
                label = name if inner is None else f"{name}{METRIC_SEPARATOR}{inner}"
                raise ValueError(f"{path}: metric {label!r} must be a number, got {number!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_row(record_path: Path, runs_dir: Path, stem: str) -> dict:
    """Read one run folder into a row of ``collect_results``."""
    run_dir = record_path.parent
    record = read_json(record_path)
    parameters = record.get("parameters", {})
    relative = run_dir.relative_to(runs_dir).parts  # ([variant,] stem, dataset, seedN)
    row = {
        "notebook": stem,
        "variant": relative[0] if len(relative) == 4 else "",
        "dataset": parameters.get("dataset", relative[-2]),
        "seed": int(parameters.get("seed", relative[-1].removeprefix("seed"))),
        "status": record.get("status"),
        "run_dir": str(run_dir),
        "error": None,
        "settings": None,
        "parameters": parameters,
    }

    results_path = run_dir / RESULTS_FILE
    if row["status"] != "ok":
        error = record.get("error") or {}
        row["error"] = f"run status {row['status']!r}" + (f": {error.get('ename')}: {error.get('evalue')}" if error else "")
    elif not results_path.is_file():
        row["error"] = f"the run finished ok but wrote no {RESULTS_FILE}"
    else:
        results = read_results(results_path)
        _check_run_matches(results["settings"], row, results_path)
        row["settings"] = results["settings"]
        row.update(flatten_metrics(results["metrics"]))
    row["shots"] = (row["settings"] or {}).get("shots", parameters.get("shots"))
    return row


def _check_run_matches(settings: Mapping[str, Any], row: Mapping[str, Any], path: Path) -> None:
    for key in ("dataset", "seed"):
        if key in settings and settings[key] != row[key]:
            raise ValueError(
                f"{path}: settings have {key}={settings[key]!r} but the run was started with {key}={row[key]!r}"
            )


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten nested metrics such as {target: accuracy} into ``name/target`` columns."""
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}{METRIC_SEPARATOR}{inner}": float(number) for inner, number in value.items()})
        else:
            flat[name] = float(value)
    return flat


def _seed_tuple(seeds: Iterable[int]) -> tuple[int, ...]:
    seeds = tuple(int(seed) for seed in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"expected_seeds={seeds} must list each seed once and not be empty")
    return seeds


def _table_datasets(df: pd.DataFrame, datasets: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if datasets is not None:
        return list(datasets)
    present = [] if df.empty else list(dict.fromkeys(df["dataset"]))
    return list(default) + sorted(name for name in present if name not in default)


def _group_rows(df: pd.DataFrame, **conditions: Any) -> pd.DataFrame:
    if df.empty:
        return df
    mask = np.ones(len(df), dtype=bool)
    for column, value in conditions.items():
        mask &= (df[column] == value).to_numpy()
    return df[mask]


def _finished_by_seed(group: pd.DataFrame, label: str, expected_seeds: tuple[int, ...], metrics: Sequence[str]) -> dict[int, pd.Series]:
    """Return the run of each expected seed that finished ok with ``metrics``; reject two runs of one seed."""
    repeated = sorted({int(seed) for seed in group["seed"] if (group["seed"] == seed).sum() > 1})
    if repeated:
        folders = sorted(group[group["seed"].isin(repeated)]["run_dir"])
        raise ValueError(f"{label}: seed(s) {repeated} have several runs {folders}; select one run per seed first")
    finished = {}
    for _, run in group.iterrows():
        has_metrics = all(metric in run.index and not _missing(run[metric]) for metric in metrics)
        if run["status"] == "ok" and has_metrics and int(run["seed"]) in expected_seeds:
            finished[int(run["seed"])] = run
    return finished


def _status(group: pd.DataFrame, finished: Mapping[int, Any], expected_seeds: tuple[int, ...]) -> str:
    if group.empty:
        return STATUS_NOT_RUN
    if set(finished) == set(expected_seeds):
        return STATUS_COMPLETE
    expected = ", ".join(str(seed) for seed in expected_seeds)
    if not finished:
        return f"incomplete (no seed of {expected} finished)"
    return f"incomplete (seeds {', '.join(str(seed) for seed in sorted(finished))} of {expected})"


def _check_same_settings(runs: Iterable[pd.Series], label: str, ignored: Sequence[str]) -> None:
    """Raise ValueError naming the settings keys on which the runs of one group differ."""
    flat = [(run["run_dir"], _flatten_settings(run["settings"] or {}, ignored)) for run in runs]
    if len(flat) < 2:
        return
    keys = sorted(set().union(*(settings.keys() for _, settings in flat)))
    differing = [key for key in keys if len({repr(settings.get(key, "<missing>")) for _, settings in flat}) > 1]
    if differing:
        raise ValueError(
            f"{label}: the runs to average differ in settings {differing} (runs: {[folder for folder, _ in flat]}); "
            "runs with different settings must not share a table cell"
        )


def _flatten_settings(settings: Mapping[str, Any], ignored: Sequence[str], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if any(dotted == name or dotted.startswith(f"{name}.") for name in ignored):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(_flatten_settings(value, ignored, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _base_to_novel_row(group: pd.DataFrame, dataset: str, expected_seeds: tuple[int, ...], ignored: Sequence[str]) -> dict:
    finished = _finished_by_seed(group, dataset, expected_seeds, ("base_accuracy", "novel_accuracy"))
    status = _status(group, finished, expected_seeds)
    row = {"seeds": ", ".join(str(seed) for seed in sorted(finished)), "base": NAN, "base_std": NAN,
           "novel": NAN, "novel_std": NAN, "hm": NAN, "status": status}
    if status != STATUS_COMPLETE:
        return row

    runs = [finished[seed] for seed in expected_seeds]
    _check_same_settings(runs, dataset, ignored)
    base = np.array([run["base_accuracy"] for run in runs], dtype=np.float64)  # (seeds,)
    novel = np.array([run["novel_accuracy"] for run in runs], dtype=np.float64)  # (seeds,)
    row.update(
        base=float(base.mean()), base_std=_sample_std(base),
        novel=float(novel.mean()), novel_std=_sample_std(novel),
        hm=harmonic_mean(float(base.mean()), float(novel.mean())),
    )
    return row


def _accuracy_row(group: pd.DataFrame, metric: str, label: str, expected_seeds: tuple[int, ...], ignored: Sequence[str]) -> dict:
    finished = _finished_by_seed(group, label, expected_seeds, (metric,))
    status = _status(group, finished, expected_seeds)
    row = {"seeds": ", ".join(str(seed) for seed in sorted(finished)), "accuracy": NAN, "accuracy_std": NAN, "status": status}
    if status != STATUS_COMPLETE:
        return row

    runs = [finished[seed] for seed in expected_seeds]
    _check_same_settings(runs, label, ignored)
    values = np.array([run[metric] for run in runs], dtype=np.float64)  # (seeds,)
    row.update(accuracy=float(values.mean()), accuracy_std=_sample_std(values))
    return row


def _average_row(rows: Sequence[Mapping[str, Any]], row_kind: str) -> dict:
    complete = [row for row in rows if row["status"] == STATUS_COMPLETE]
    if rows and len(complete) == len(rows):
        return {"seeds": "", "accuracy": float(np.mean([row["accuracy"] for row in rows])), "accuracy_std": NAN,
                "status": STATUS_COMPLETE}
    return {"seeds": "", "accuracy": NAN, "accuracy_std": NAN,
            "status": f"incomplete ({len(complete)} of {len(rows)} {row_kind} complete)"}


def _transfer_table(
    df: pd.DataFrame, source: str, targets: Sequence[str], expected_seeds: tuple[int, ...], ignored: Sequence[str]
) -> pd.DataFrame:
    group = _group_rows(df, dataset=source)
    trained = _finished_by_seed(group, source, expected_seeds, ())
    if set(trained) == set(expected_seeds):
        _check_same_settings([trained[seed] for seed in expected_seeds], source, ignored)

    rows = {source: _accuracy_row(group, "accuracy", source, expected_seeds, ignored)}
    for target in targets:
        rows[target] = _accuracy_row(group, f"target_accuracy{METRIC_SEPARATOR}{target}", f"{source} -> {target}",
                                     expected_seeds, ignored)
    rows[AVERAGE] = _average_row([rows[target] for target in targets], "targets")

    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "dataset"
    return table


def _sample_std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else NAN


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _alignment(column: pd.Series) -> str:
    return "---:" if pd.api.types.is_numeric_dtype(column) else ":---"


def _format_cell(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{decimals}f}"
    return str(value).replace("|", "\\|")
