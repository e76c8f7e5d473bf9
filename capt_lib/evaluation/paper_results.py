"""Published accuracies that the reproduction tables are compared with, each with its source.

Only the base-to-novel table of the CAPT paper (``CAPT_PAPER``) is recorded: per dataset
for CAPT, and the average row for the baselines it compares with. Datasets use capt's
names (those of ``data_manifests/``), and ``PAPER_DATASET_TITLES`` gives the spelling of
CAPT's table.
All numbers are top-1 accuracies in percent, CLIP ViT-B/16, 16 shots, mean of 3 seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

AVERAGE = "average"  # row name of the mean over the datasets

CAPT_PAPER = (
    'Shao et al., "CAPT: Confusion-Aware Prompt Tuning for Reducing Vision-Language Misalignment", '
    "CVPR 2026, arXiv 2603.02557"
)
BASE_TO_NOVEL_SOURCE = f"{CAPT_PAPER}, Table 1 (base-to-novel generalisation)"

# The eleven datasets of the base-to-novel, few-shot and cross-dataset protocols, in the order of CAPT's table.
PAPER_DATASET_TITLES = {
    "imagenet": "ImageNet",
    "caltech101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102",
    "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
}
BASE_TO_NOVEL_DATASETS = tuple(PAPER_DATASET_TITLES)
CROSS_DATASET_SOURCE = "imagenet"
CROSS_DATASET_TARGETS = tuple(name for name in PAPER_DATASET_TITLES if name != "imagenet")
DOMAIN_GENERALIZATION_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


@dataclass(frozen=True)
class PublishedBaseToNovel:
    """One row of a published base-to-novel table."""

    method: str  # method name as CAPT's table writes it
    dataset: str  # capt dataset name, or AVERAGE
    base: float  # accuracy on the base classes, percent
    novel: float  # accuracy on the novel classes, percent
    hm: float  # harmonic mean 2 * base * novel / (base + novel) as printed
    source: str  # where the numbers are printed


# NOTE: CAPT's average row does not follow from its dataset rows. The mean of the eleven
# Base values is 87.41, as printed, but the mean of the Novel values is 80.73, not 80.90.
# The printed HM 83.90 is neither the HM of the printed averages (84.03) nor the mean of
# the per-dataset HMs (83.79). Every row is recorded as printed.
_CAPT_ROWS = (
    (AVERAGE, 87.41, 80.90, 83.90),
    ("imagenet", 80.51, 75.13, 77.73),
    ("caltech101", 99.10, 96.34, 97.70),
    ("oxford_pets", 96.44, 97.71, 97.07),
    ("stanford_cars", 83.43, 84.26, 83.84),
    ("oxford_flowers", 98.78, 82.91, 90.15),
    ("food101", 92.43, 93.96, 93.19),
    ("fgvc_aircraft", 49.67, 40.31, 44.50),
    ("sun397", 83.98, 81.32, 82.63),
    ("dtd", 88.19, 72.38, 79.51),
    ("eurosat", 97.60, 81.32, 88.72),
    ("ucf101", 91.42, 82.36, 86.65),
)
_BASELINE_AVERAGES = (
    ("CoOp", 82.69, 63.22, 71.66),
    ("MaPLe", 82.28, 75.14, 78.55),
    ("PromptKD", 86.96, 80.73, 83.73),
)

PUBLISHED_BASE_TO_NOVEL = tuple(
    [PublishedBaseToNovel("CAPT", dataset, base, novel, hm, BASE_TO_NOVEL_SOURCE) for dataset, base, novel, hm in _CAPT_ROWS]
    + [PublishedBaseToNovel(method, AVERAGE, base, novel, hm, BASE_TO_NOVEL_SOURCE) for method, base, novel, hm in _BASELINE_AVERAGES]
)


def published_methods() -> list[str]:
    """Return the methods with published base-to-novel numbers, in the order recorded."""
    return list(dict.fromkeys(row.method for row in PUBLISHED_BASE_TO_NOVEL))


def paper_base_to_novel(method: str = "CAPT") -> pd.DataFrame:
    """Return the published base-to-novel rows of ``method``, indexed by dataset.

    Columns: ``base``, ``novel``, ``hm`` and ``source``. CAPT has a row per dataset plus
    ``average``; the baselines have the ``average`` row only.
    """
    rows = [row for row in PUBLISHED_BASE_TO_NOVEL if row.method == method]
    if not rows:
        raise ValueError(f"no published base-to-novel numbers for method {method!r}; recorded: {published_methods()}")
    table = pd.DataFrame(
        [{"dataset": row.dataset, "base": row.base, "novel": row.novel, "hm": row.hm, "source": row.source} for row in rows]
    )
    return table.set_index("dataset")
