"""Accuracy, base-to-novel harmonic mean, confusion matrices and confusion-pair metrics.

Every function accepts NumPy arrays or torch tensors (on any device) and returns plain
Python numbers, NumPy arrays or pandas DataFrames. Accuracies and rates are percentages.

Confusion pairs follow one convention throughout. An ordered pair (a, b) means "true
class a, predicted as b". With ``symmetric=True`` a pair names the unordered set
{a, b}, written (min, max), and covers mistakes in both directions. Pairs may be given
as (a, b) or as (a, b, count) tuples, so the output of ``top_confusion_pairs`` can be
passed straight on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from capt_lib.confusion.bank import rank_confusion_pairs

RANK_CORRELATION_METHODS = ("spearman", "kendall")


def accuracy(logits_or_preds: Any, labels: Any) -> float:
    """Return the top-1 accuracy in percent.

    A 2-D input (N, C) is read as scores and reduced with argmax over classes. A 1-D
    input must contain integer predicted labels.
    """
    predictions = _predictions(logits_or_preds, "logits_or_preds")
    labels = _labels(labels, "labels")
    _check_same_length(predictions=predictions, labels=labels)
    if len(labels) == 0:
        raise ValueError("accuracy: there are no images to score (labels is empty)")
    return float(100.0 * np.mean(predictions == labels))


def harmonic_mean(base: float, novel: float) -> float:
    """Return the base-to-novel harmonic mean 2BN / (B + N), defined as 0 when B = N = 0."""
    for name, value in (("base", base), ("novel", novel)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"harmonic_mean: {name}={value!r} must be a finite, non-negative accuracy")
    if base + novel == 0:
        return 0.0
    return 2.0 * base * novel / (base + novel)


def confusion_matrix(true: Any, pred: Any, num_classes: int) -> np.ndarray:
    """Return the (C, C) int64 matrix with rows = true class and columns = predicted class.

    The diagonal (correct predictions) is kept; ``top_confusion_pairs`` ignores it.
    """
    true = _labels(true, "true")
    pred = _labels(pred, "pred")
    _check_same_length(true=true, pred=pred)
    for name, labels in (("true", true), ("pred", pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"confusion_matrix: {name} labels must lie in [0, {num_classes}), "
                f"found [{labels.min()}, {labels.max()}]"
            )
    flat = true * num_classes + pred  # (N,)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_confusion_pairs(cm: Any, k: int | None, symmetric: bool = False) -> list[tuple[int, int, Any]]:
    """Return the ``k`` largest off-diagonal cells of ``cm`` as (a, b, count).

    Pairs are ordered by count descending, then (a, b) ascending, and pairs with count 0
    are left out, the same rule as ``ConfusionBank.top_pairs``. With ``symmetric=True``
    the count of {a, b} is ``cm[a, b] + cm[b, a]``.
    """
    return rank_confusion_pairs(_to_numpy(cm), k, symmetric=symmetric)


def pair_overlap(
    pairs_a: Iterable[Sequence[int]], pairs_b: Iterable[Sequence[int]], *, symmetric: bool = False
) -> dict:
    """Compare two pair lists, for example the top pairs of two seeds or two base models.

    Returns ``jaccard`` (size of the intersection over size of the union, 1.0 when both
    lists are empty), and the sorted lists ``shared``, ``only_a`` and ``only_b``. With
    ``symmetric=True`` (a, b) and (b, a) count as the same pair.
    """
    set_a = set(_normalise_pairs(pairs_a, symmetric))
    set_b = set(_normalise_pairs(pairs_b, symmetric))
    union = set_a | set_b
    return {
        "jaccard": len(set_a & set_b) / len(union) if union else 1.0,
        "shared": sorted(set_a & set_b),
        "only_a": sorted(set_a - set_b),
        "only_b": sorted(set_b - set_a),
    }


def rank_correlation_of_pairs(cm_a: Any, cm_b: Any, method: str = "spearman") -> float:
    """Return the rank correlation of the off-diagonal cells of two (C, C) confusion matrices.

    ``method`` is "spearman" (Pearson correlation of average ranks) or "kendall"
    (tau-b, which corrects for ties). Both handle the many zero cells as ties. The
    result is NaN when either matrix has all off-diagonal cells equal, because a
    correlation with a constant is undefined.
    """
    if method not in RANK_CORRELATION_METHODS:
        raise ValueError(f"method={method!r} is invalid; choose one of {RANK_CORRELATION_METHODS}")
    matrix_a = _to_numpy(cm_a)
    matrix_b = _to_numpy(cm_b)
    if matrix_a.ndim != 2 or matrix_a.shape[0] != matrix_a.shape[1] or matrix_a.shape != matrix_b.shape:
        raise ValueError(
            f"rank_correlation_of_pairs: cm_a and cm_b must be square matrices of one shape, "
            f"got {matrix_a.shape} and {matrix_b.shape}"
        )

    off_diagonal = ~np.eye(matrix_a.shape[0], dtype=bool)
    x = matrix_a[off_diagonal].astype(np.float64)  # (C * (C - 1),)
    y = matrix_b[off_diagonal].astype(np.float64)
    if len(x) < 2:
        return float("nan")
    if method == "spearman":
        return _pearson(_average_ranks(x), _average_ranks(y))
    return _kendall_tau_b(x, y)


def pair_resolution(
    base_pred: Any, tuned_pred: Any, labels: Any, pairs: Iterable[Sequence[int]], *, symmetric: bool = False
) -> dict:
    """Measure how many of the base model's in-pair mistakes the tuned model fixes.

    An in-pair mistake is a test image of true class a that the base model predicted as
    b, where (a, b) is in ``pairs`` (either direction when ``symmetric=True``). The
    pair resolution rate is the share of those images, in percent, that the tuned
    model classifies correctly. It is NaN when the base model made no in-pair mistake.

    Returned keys:

    - ``num_images``: all test images.
    - ``base_errors_in_pairs``: the base model's in-pair mistakes, which split into
      ``resolved``, ``still_confused`` (the tuned model repeats the base model's
      prediction) and ``wrong_elsewhere`` (a different wrong class).
    - ``pair_resolution_rate``: ``resolved`` over ``base_errors_in_pairs``, in percent.
    - ``newly_confused_in_pairs``: images the base model got right and the tuned model
      gets wrong within a pair.
    - ``newly_wrong`` and ``newly_right``: changes between the models over all images.
    - ``base_accuracy`` and ``tuned_accuracy``, in percent.

    Report ``newly_wrong`` beside the rate, because fixing pairs can break other images.
    """
    base_pred, tuned_pred, labels = _prediction_triplet(base_pred, tuned_pred, labels)
    pair_list = _normalise_pairs(pairs, symmetric)
    in_pair_error = _in_pairs(labels, base_pred, pair_list, symmetric)  # (N,) base model's in-pair mistakes
    outcome = _outcome_counts(base_pred, tuned_pred, labels, in_pair_error)

    base_right = base_pred == labels
    tuned_right = tuned_pred == labels
    newly_confused = base_right & _in_pairs(labels, tuned_pred, pair_list, symmetric)
    return {
        "num_images": int(len(labels)),
        **outcome,
        "newly_confused_in_pairs": int(newly_confused.sum()),
        "newly_wrong": int((base_right & ~tuned_right).sum()),
        "newly_right": int((~base_right & tuned_right).sum()),
        "base_accuracy": float(100.0 * base_right.mean()),
        "tuned_accuracy": float(100.0 * tuned_right.mean()),
    }


def per_pair_table(
    base_pred: Any,
    tuned_pred: Any,
    labels: Any,
    pairs: Iterable[Sequence[int]],
    *,
    classnames: Sequence[str] | None = None,
    symmetric: bool = False,
) -> pd.DataFrame:
    """Return one row per pair with the counts of ``pair_resolution`` restricted to that pair.

    Columns: ``class_a`` and ``class_b`` (with ``name_a`` and ``name_b`` when
    ``classnames`` is given), ``base_errors``, ``resolved``, ``still_confused``,
    ``wrong_elsewhere``, ``newly_confused`` and ``resolution_rate`` (percent, NaN for
    a pair without base errors). Rows keep the order of ``pairs``, without duplicates.
    """
    base_pred, tuned_pred, labels = _prediction_triplet(base_pred, tuned_pred, labels)
    pair_list = _normalise_pairs(pairs, symmetric)
    base_right = base_pred == labels

    rows = []
    for a, b in pair_list:
        in_pair_error = _in_pairs(labels, base_pred, [(a, b)], symmetric)
        outcome = _outcome_counts(base_pred, tuned_pred, labels, in_pair_error)
        row = {"class_a": a, "class_b": b}
        if classnames is not None:
            row.update(name_a=_classname(classnames, a), name_b=_classname(classnames, b))
        row.update(
            base_errors=outcome["base_errors_in_pairs"],
            resolved=outcome["resolved"],
            still_confused=outcome["still_confused"],
            wrong_elsewhere=outcome["wrong_elsewhere"],
            newly_confused=int((base_right & _in_pairs(labels, tuned_pred, [(a, b)], symmetric)).sum()),
            resolution_rate=outcome["pair_resolution_rate"],
        )
        rows.append(row)

    columns = ["class_a", "class_b"] + (["name_a", "name_b"] if classnames is not None else [])
    columns += ["base_errors", "resolved", "still_confused", "wrong_elsewhere", "newly_confused", "resolution_rate"]
    return pd.DataFrame(rows, columns=columns)


def pair_rank_table(
    top_pairs_by_run: Mapping[str, Iterable[Sequence[int]]], *, symmetric: bool = False
) -> pd.DataFrame:
    """Tabulate where each pair ranks in several runs' top-pair lists (rank 1 = most confused).

    ``top_pairs_by_run`` maps a run name (a seed, a base model) to that run's pairs in
    rank order. The result has one row per pair, indexed by (class_a, class_b), one
    column per run, and NaN where a run's list does not contain the pair. Rows come
    sorted by the number of runs that contain the pair (most first), then by mean rank
    over those runs, then by (a, b).
    """
    if not top_pairs_by_run:
        raise ValueError("pair_rank_table: top_pairs_by_run is empty; pass at least one run")
    ranks: dict[str, dict[tuple[int, int], int]] = {}
    for run, pairs in top_pairs_by_run.items():
        ranks[str(run)] = {pair: position + 1 for position, pair in enumerate(_normalise_pairs(pairs, symmetric))}
    all_pairs = list(dict.fromkeys(pair for run_ranks in ranks.values() for pair in run_ranks))

    index = pd.MultiIndex.from_arrays(
        [[a for a, _ in all_pairs], [b for _, b in all_pairs]], names=["class_a", "class_b"]
    )
    columns = {run: [run_ranks.get(pair, np.nan) for pair in all_pairs] for run, run_ranks in ranks.items()}
    table = pd.DataFrame(columns, index=index, dtype=float)  # (pairs, runs); NaN where a run lacks the pair

    runs_containing = table.notna().sum(axis=1).to_numpy()
    mean_rank = table.mean(axis=1).to_numpy()
    order = sorted(range(len(all_pairs)), key=lambda i: (-runs_containing[i], mean_rank[i], all_pairs[i]))
    return table.iloc[order]


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype in (torch.bfloat16, torch.float16) else value).numpy()
    return np.asarray(value)


def _labels(value: Any, name: str) -> np.ndarray:
    array = _to_numpy(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must contain integer labels, got dtype {array.dtype}")
    return array.astype(np.int64)


def _predictions(value: Any, name: str) -> np.ndarray:
    array = _to_numpy(value)
    if array.ndim == 2:
        return array.argmax(axis=1)
    if array.ndim == 1:
        return _labels(array, name)
    raise ValueError(f"{name} must be (N, C) scores or (N,) predicted labels, got shape {array.shape}")


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have one length per image, got lengths {lengths}")


def _prediction_triplet(base_pred: Any, tuned_pred: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base_pred = _predictions(base_pred, "base_pred")
    tuned_pred = _predictions(tuned_pred, "tuned_pred")
    labels = _labels(labels, "labels")
    _check_same_length(base_pred=base_pred, tuned_pred=tuned_pred, labels=labels)
    if len(labels) == 0:
        raise ValueError("there are no test images (labels is empty)")
    for name, array in (("base_pred", base_pred), ("tuned_pred", tuned_pred), ("labels", labels)):
        if array.min() < 0:
            raise ValueError(f"{name} contains the negative label {array.min()}; labels must be class indices")
    return base_pred, tuned_pred, labels


def _normalise_pairs(pairs: Iterable[Sequence[int]], symmetric: bool) -> list[tuple[int, int]]:
    """Turn (a, b) or (a, b, count) items into unique (a, b) tuples in first-seen order."""
    seen: dict[tuple[int, int], None] = {}
    for item in pairs:
        if len(item) not in (2, 3):
            raise ValueError(f"a confusion pair must be (a, b) or (a, b, count), got {item!r}")
        a, b = int(item[0]), int(item[1])
        if a == b or a < 0 or b < 0:
            raise ValueError(f"a confusion pair needs two different non-negative class labels, got {item!r}")
        seen[(min(a, b), max(a, b)) if symmetric else (a, b)] = None
    return list(seen)


def _in_pairs(true: np.ndarray, pred: np.ndarray, pairs: list[tuple[int, int]], symmetric: bool) -> np.ndarray:
    """Return the (N,) mask of images whose (true, pred) is one of ``pairs``; pred == true never is."""
    if not pairs:
        return np.zeros(len(true), dtype=bool)
    if symmetric:
        true, pred = np.minimum(true, pred), np.maximum(true, pred)
    width = int(max(true.max(), pred.max(), max(max(pair) for pair in pairs))) + 1
    image_codes = true * width + pred  # (N,)
    pair_codes = np.array([a * width + b for a, b in pairs], dtype=np.int64)
    return np.isin(image_codes, pair_codes)


def _outcome_counts(
    base_pred: np.ndarray, tuned_pred: np.ndarray, labels: np.ndarray, in_pair_error: np.ndarray
) -> dict:
    """Split the base model's in-pair mistakes by what the tuned model predicts for them."""
    resolved = in_pair_error & (tuned_pred == labels)
    still_confused = in_pair_error & (tuned_pred == base_pred)
    wrong_elsewhere = in_pair_error & ~resolved & ~still_confused
    total = int(in_pair_error.sum())
    return {
        "base_errors_in_pairs": total,
        "resolved": int(resolved.sum()),
        "still_confused": int(still_confused.sum()),
        "wrong_elsewhere": int(wrong_elsewhere.sum()),
        "pair_resolution_rate": 100.0 * int(resolved.sum()) / total if total else float("nan"),
    }


def _classname(classnames: Sequence[str], label: int) -> str:
    if not 0 <= label < len(classnames):
        raise ValueError(f"pair label {label} is out of range for {len(classnames)} class names")
    return classnames[label]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Return 1-based ranks, with tied values sharing the mean of their positions."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]  # (n,)
    group_of = np.cumsum(starts_group) - 1  # (n,) group index of each sorted position
    group_start = np.flatnonzero(starts_group)
    group_end = np.r_[group_start[1:], len(values)]  # exclusive
    group_rank = (group_start + group_end - 1) / 2.0 + 1.0  # mean of the 1-based positions in each group

    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = group_rank[group_of]
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator > 0 else float("nan")


def _tied_pairs_sorted(*columns: np.ndarray) -> int:
    """Return the number of index pairs equal in every column; rows must be sorted by the columns."""
    changes = np.zeros(len(columns[0]) - 1, dtype=bool)
    for column in columns:
        changes |= column[1:] != column[:-1]
    group_starts = np.flatnonzero(np.r_[True, changes])
    group_sizes = np.diff(np.r_[group_starts, len(columns[0])])
    return int((group_sizes * (group_sizes - 1) // 2).sum())


def _kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b in O(n log^2 n), by counting inversions after sorting by (x, y).

    After sorting by x and then y, a pair i < j is discordant exactly when y_i > y_j:
    pairs tied in x are sorted by y and so never count.
    """
    n = len(x)
    total_pairs = n * (n - 1) // 2
    order = np.lexsort((y, x))
    x_sorted, y_sorted = x[order], y[order]
    tied_x = _tied_pairs_sorted(x_sorted)
    tied_xy = _tied_pairs_sorted(x_sorted, y_sorted)
    tied_y = _tied_pairs_sorted(np.sort(y))
    if tied_x == total_pairs or tied_y == total_pairs:
        return float("nan")

    discordant = _count_inversions(y_sorted)
    concordant_minus_discordant = total_pairs - tied_x - tied_y + tied_xy - 2 * discordant
    return concordant_minus_discordant / math.sqrt((total_pairs - tied_x) * (total_pairs - tied_y))


def _count_inversions(values: np.ndarray) -> int:
    """Return the number of pairs i < j with values[i] > values[j], with bottom-up merging.

    At width w the positions form blocks of 2w, and each element of a block's right
    half is compared with the block's left half; every pair i < j meets in exactly one
    level. Keys ``block * m + dense_rank`` let one sorted array and ``searchsorted``
    count the larger left-half values of every right-half element at once.
    """
    _, dense = np.unique(values, return_inverse=True)
    dense = dense.astype(np.int64).ravel()  # (n,) values replaced by ranks 0..m-1
    n, m = len(dense), int(dense.max()) + 1 if len(dense) else 1
    positions = np.arange(n)

    inversions = 0
    width = 1
    while width < n:
        block = positions // (2 * width)
        is_left = (positions % (2 * width)) < width
        left_keys = np.sort(block[is_left] * m + dense[is_left])
        right_block, right_value = block[~is_left], dense[~is_left]
        block_end = np.searchsorted(left_keys, (right_block + 1) * m, side="left")
        not_greater = np.searchsorted(left_keys, right_block * m + right_value, side="right")
        inversions += int((block_end - not_greater).sum())
        width *= 2
    return inversions
