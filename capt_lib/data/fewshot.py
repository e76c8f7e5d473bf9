"""Few-shot sampling per class, deterministic for a given seed."""

from __future__ import annotations

import numpy as np

from capt_lib.data.dataset import ClassificationDataset


def sample_few_shot(dataset: ClassificationDataset, shots: int, seed: int) -> ClassificationDataset:
    """Keep ``shots`` random images of each class; ``shots <= 0`` keeps every image.

    Each class draws from its own generator seeded by ``(seed, label)``, so the images
    picked for one class do not change when another class is added or removed. A class
    with fewer than ``shots`` images keeps all of them, as in the CoOp family's sampler.
    The result keeps the dataset's order of items.
    """
    if shots <= 0:
        return dataset

    keep = []
    for label in range(dataset.num_classes):
        positions = np.flatnonzero(dataset.labels == label)
        if len(positions) == 0:
            raise ValueError(
                f"{dataset.name}/{dataset.split}: class {label} ({dataset.classnames[label]!r}) "
                "has no images to sample few-shot examples from"
            )
        rng = np.random.default_rng([seed, label])
        chosen = rng.choice(positions, size=min(shots, len(positions)), replace=False)
        keep.append(chosen)

    return dataset.subset(np.sort(np.concatenate(keep)))
