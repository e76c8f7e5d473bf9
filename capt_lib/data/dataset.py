"""The dataset abstraction every loader returns: images (in memory or on disk) and labels."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image


@dataclass(frozen=True, eq=False)
class ClassificationDataset:
    """A labelled image set with its class names, ordered by label.

    Exactly one of ``images`` and ``paths`` is set. ``images`` contains small in-memory
    data such as Fashion-MNIST, and ``paths`` lists image files such as the CoOp-format
    benchmarks. ``indices`` maps each item back to its position in the source split,
    so few-shot subsets and confusion banks can name the exact images they contain.
    """

    name: str  # dataset name, e.g. "fashion_mnist"
    split: str  # "train", "val" or "test"
    classnames: tuple[str, ...]  # classnames[label] is the name of that label
    labels: np.ndarray  # (N,) int64 labels in [0, len(classnames))
    indices: np.ndarray  # (N,) int64 positions in the source split
    images: np.ndarray | None = None  # (N, H, W) or (N, H, W, 3) uint8
    paths: tuple[str, ...] | None = None  # image files, when not in memory

    def __post_init__(self):
        if (self.images is None) == (self.paths is None):
            raise ValueError(f"{self.name}/{self.split}: exactly one of images and paths must be given")
        n_items = len(self.images) if self.images is not None else len(self.paths)
        if len(self.labels) != n_items or len(self.indices) != n_items:
            raise ValueError(
                f"{self.name}/{self.split}: {n_items} images but {len(self.labels)} labels "
                f"and {len(self.indices)} indices"
            )
        if n_items and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise ValueError(
                f"{self.name}/{self.split}: labels must lie in [0, {len(self.classnames)}), "
                f"found [{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def load_image(self, i: int) -> Image.Image:
        """Return item ``i`` as an RGB PIL image."""
        if self.images is not None:
            return Image.fromarray(self.images[i]).convert("RGB")
        return Image.open(self.paths[i]).convert("RGB")

    def subset(self, positions: Sequence[int] | np.ndarray) -> "ClassificationDataset":
        """Return the items at ``positions`` (positions in this dataset, not source indices)."""
        positions = np.asarray(positions, dtype=np.int64)
        return dataclasses.replace(
            self,
            labels=self.labels[positions],
            indices=self.indices[positions],
            images=None if self.images is None else self.images[positions],
            paths=None if self.paths is None else tuple(self.paths[p] for p in positions),
        )

    def fingerprint(self) -> dict:
        """Describe the exact content cheaply, for cache keys: name, split, classes and items."""
        if self.images is not None:
            source = "memory"
        elif self.paths:
            source = os.path.commonpath(self.paths)
        else:
            source = ""
        return {
            "name": self.name,
            "split": self.split,
            "classnames": list(self.classnames),
            "n": len(self),
            "indices_sha": _array_sha(self.indices),
            "labels_sha": _array_sha(self.labels),
            "source": source,
        }


def _array_sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
