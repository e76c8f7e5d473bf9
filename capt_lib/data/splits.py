"""The base-to-novel class split used by the CoOp family and by CAPT."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from capt_lib.data.dataset import ClassificationDataset


def base_novel_labels(num_classes: int) -> tuple[list[int], list[int]]:
    """Return (base, novel) label lists: the first ceil(n/2) labels are base, the rest novel."""
    if num_classes < 2:
        raise ValueError(f"a base/novel split needs at least 2 classes, got {num_classes}")
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def keep_classes(dataset: ClassificationDataset, labels: list[int]) -> ClassificationDataset:
    """Keep the items of ``labels`` and relabel them 0..len(labels)-1 in the given order."""
    relabel = np.full(dataset.num_classes, -1, dtype=np.int64)
    relabel[labels] = np.arange(len(labels))
    positions = np.flatnonzero(np.isin(dataset.labels, labels))
    subset = dataset.subset(positions)
    return dataclasses.replace(
        subset,
        labels=relabel[subset.labels],
        classnames=tuple(dataset.classnames[label] for label in labels),
    )


def split_base_novel(
    train: ClassificationDataset, *others: ClassificationDataset, part: str
) -> list[ClassificationDataset]:
    """Keep the ``part`` ("base" or "novel") classes of every dataset, relabelled from 0.

    The class set comes from ``train``: labels are sorted and the first ceil(n/2) are base.
    Every class of ``train`` must have at least one image, because a class without
    training images would silently shift the split.
    """
    if part not in ("base", "novel"):
        raise ValueError(f"part={part!r} is invalid; choose 'base' or 'novel'")
    counts = np.bincount(train.labels, minlength=train.num_classes)
    empty = [train.classnames[label] for label in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"{train.name}/{train.split}: classes with no training images: {empty}")

    base, novel = base_novel_labels(train.num_classes)
    labels = base if part == "base" else novel
    for other in others:
        if other.classnames != train.classnames:
            raise ValueError(
                f"{other.name}/{other.split} has different class names from {train.name}/{train.split}; "
                "split datasets that share one label space"
            )
    return [keep_classes(d, labels) for d in (train, *others)]
