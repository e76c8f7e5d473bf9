"""Loaders for the 15 CoOp-format benchmarks, reading the on-disk layout and split files as they are.

``load_coop_dataset(name, root, split)`` returns a paths-based ClassificationDataset for
the dataset folder ``<root>/<manifest.folder>``, the layout CoOp's DATASETS.md
describes. How the items of a split are listed depends on the manifest's loader:

* ``split_json``: the CoOp split file, a JSON object with ``train``, ``val`` and
  ``test`` lists of ``[relative path, label, class name]`` entries.
* ``fgvc_variants``: FGVC-Aircraft's official ``variants.txt`` and
  ``images_variant_<split>.txt`` lists.
* ``imagenet``: WNID folders under ``images/train`` and ``images/val`` plus
  ``classnames.txt``; split "val" and split "test" are both ``images/val``, as in CoOp.
* ``wnid_folders``: WNID folders of a test-only ImageNet variant; the label space is
  the folders present (200 for ImageNet-A and -R).
* ``numeric_folders``: ImageNetV2's folders 0..999, where the folder number is the label.

Before listing a split, the loader runs the fast check of ``capt_lib.data.check`` and
rejects a dataset that fails it with the check's report as the message. Unlike CoOp, no
loader ever writes into the dataset folder (no regenerated split, no pickles).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from capt_lib.data.dataset import ClassificationDataset
from capt_lib.data.manifest import Manifest, load_manifest

logger = logging.getLogger(__name__)

MAX_VAL_SHOTS = 4  # the CoOp family samples min(K, 4) validation images per class


@dataclass(frozen=True)
class SplitListing:
    """The items of one split as the dataset's files list them, before any validation."""

    paths: tuple[str, ...]  # image paths relative to the dataset folder
    labels: tuple[int, ...]  # label of each item
    names: tuple[str, ...]  # class name of each item, as the source file or folder gives it
    classnames: tuple[str, ...] | None  # label space by label, when the source fixes it; None for split JSONs


def val_shots(shots: int) -> int:
    """Return the validation shots per class that the CoOp family pairs with ``shots`` training shots.

    CoOp, CoCoOp, MaPLe and PromptSRC sample ``min(K, 4)`` validation images per class
    when they sample K training shots. ``shots <= 0`` means "use the full split" for
    training and returns ``shots`` unchanged, so it keeps the full validation split too.
    """
    if shots <= 0:
        return shots
    return min(shots, MAX_VAL_SHOTS)


def load_coop_dataset(name: str, root: str | os.PathLike, split: str) -> ClassificationDataset:
    """Load split ``split`` ("train", "val" or "test") of benchmark ``name`` from the data folder ``root``.

    ``root`` is the folder that contains the dataset folders (CoOp's ``--root``), e.g.
    ``DATA`` for ``DATA/caltech-101``. Raises ValueError for an unknown name or a split
    the dataset lacks, and FileNotFoundError or ValueError with the fast check's report
    when the prepared dataset fails it (FileNotFoundError when every problem is a file or
    folder not found where expected).
    """
    from capt_lib.data.check import inspect_dataset, rejection_error  # check.py imports this module's readers

    manifest = load_manifest(name)
    if split not in manifest.splits:
        raise ValueError(
            f"{manifest.name} has no split {split!r}; valid splits are {list(manifest.splits)}"
            + (" (the ImageNet variants are test sets only)" if manifest.splits == ("test",) else "")
        )

    report = inspect_dataset(manifest, root, splits=(split,), full=False)
    if not report.ok:
        raise rejection_error(report)
    for issue in report.warnings:
        warnings.warn(f"{manifest.name}/{split}: {issue.message}", stacklevel=2)

    listing = report.listings[split]
    dataset_dir = manifest.dataset_dir(root)
    logger.info("loaded %s/%s: %d images, %d classes from %s",
                manifest.name, split, len(listing.paths), len(report.classnames), dataset_dir)
    return ClassificationDataset(
        name=manifest.name,
        split=split,
        classnames=report.classnames,
        labels=np.asarray(listing.labels, dtype=np.int64),
        indices=np.arange(len(listing.paths), dtype=np.int64),
        paths=tuple(str(dataset_dir / path) for path in listing.paths),
    )


# ---------------------------------------------------------------------------------------
# Readers: list the items of a split from the files on disk.


def read_split_file(path: str | os.PathLike) -> dict[str, list[tuple[str, int, str]]]:
    """Read a CoOp split JSON into ``{split: [(relative path, label, class name), ...]}``.

    Raises ValueError naming the file, the split and the entry index when the file does
    not have CoOp's shape.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or set(raw) != {"train", "val", "test"}:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} must be a JSON object with the keys train, val and test, found {found}")

    splits = {}
    for split, entries in raw.items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: {split!r} must be a list of [path, label, class name] entries")
        splits[split] = [_split_entry(entry, path, split, i) for i, entry in enumerate(entries)]
    return splits


def _split_entry(entry, path: Path, split: str, index: int) -> tuple[str, int, str]:
    valid = (
        isinstance(entry, list) and len(entry) == 3
        and isinstance(entry[0], str) and entry[0]
        and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0
        and isinstance(entry[2], str) and entry[2]
    )
    if not valid:
        raise ValueError(
            f"{path}: {split}[{index}] is {entry!r}; every entry must be [relative path, label >= 0, class name]"
        )
    return entry[0], entry[1], entry[2]


def list_split_json(manifest: Manifest, dataset_dir: Path) -> dict[str, SplitListing]:
    """List every split of a ``split_json`` dataset, with paths made relative to the dataset folder."""
    entries = read_split_file(dataset_dir / manifest.split_file)
    prefix = manifest.image_dir if manifest.split_paths_relative_to == "image_dir" else "."

    listings = {}
    for split, items in entries.items():
        listings[split] = SplitListing(
            paths=tuple(os.path.normpath(os.path.join(prefix, item[0])) for item in items),
            labels=tuple(item[1] for item in items),
            names=tuple(item[2] for item in items),
            classnames=None,
        )
    return listings


def list_fgvc_split(manifest: Manifest, dataset_dir: Path, split: str) -> SplitListing:
    """List a split of FGVC-Aircraft from ``variants.txt`` and ``images_variant_<split>.txt``."""
    variants = read_lines(dataset_dir / "variants.txt")
    duplicates = sorted({name for name in variants if variants.count(name) > 1})
    if duplicates:
        raise ValueError(f"{dataset_dir / 'variants.txt'} lists these variants more than once: {duplicates}")
    label_of = {name: label for label, name in enumerate(variants)}

    list_file = dataset_dir / f"images_variant_{split}.txt"
    paths, labels, names = [], [], []
    for number, line in enumerate(read_lines(list_file), start=1):
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
            raise ValueError(f"{list_file}, line {number}: variant {variant!r} is not in variants.txt")
        paths.append(os.path.join(manifest.image_dir, image_id + ".jpg"))
        labels.append(label_of[variant])
        names.append(variant)
    return SplitListing(tuple(paths), tuple(labels), tuple(names), classnames=tuple(variants))


def list_class_folders(
    manifest: Manifest, dataset_dir: Path, split: str, wnid_names: Mapping[str, str]
) -> SplitListing:
    """List a split stored as one folder per class (ImageNet, -Sketch, -A, -R and ImageNetV2).

    WNID folders take labels in sorted order and names from ``wnid_names``. ImageNetV2's
    numeric folders take the folder number as the label and the name at that position of
    ``wnid_names``, so folder "10" is label 10 whatever the string order. Files other than
    folders at the top (ImageNet-A's README.txt) are skipped.
    """
    class_root = dataset_dir / manifest.image_dir / manifest.split_dirs.get(split, ".")
    folders = [entry.name for entry in os.scandir(class_root) if entry.is_dir() and not entry.name.startswith(".")]

    if manifest.loader == "numeric_folders":
        numbers = sorted(int(folder) for folder in folders if folder.isdigit())
        vocabulary = list(wnid_names.values())
        classnames = tuple(vocabulary)
        folder_labels = [(str(number), number) for number in numbers if number < len(vocabulary)]
    else:
        unknown = sorted(folder for folder in folders if folder not in wnid_names)
        if unknown:
            raise ValueError(f"{class_root}: folders not in {manifest.classnames_file}: {unknown[:10]}")
        ordered = sorted(folders)
        classnames = tuple(wnid_names[folder] for folder in ordered)
        folder_labels = [(folder, label) for label, folder in enumerate(ordered)]

    relative_root = os.path.normpath(os.path.join(manifest.image_dir, manifest.split_dirs.get(split, ".")))
    paths, labels = [], []
    for folder, label in folder_labels:
        files = sorted(
            entry.name for entry in os.scandir(class_root / folder)
            if entry.is_file() and not entry.name.startswith(".")
        )
        paths.extend(os.path.join(relative_root, folder, file) for file in files)
        labels.extend([label] * len(files))
    names = tuple(classnames[label] for label in labels)
    return SplitListing(tuple(paths), tuple(labels), names, classnames=classnames)


def read_classnames_txt(path: str | os.PathLike) -> "OrderedDict[str, str]":
    """Read an ImageNet ``classnames.txt``: one "WNID class name" line per class, in file order.

    The name is everything after the first space and may contain spaces. Blank lines are
    skipped; a repeated WNID raises ValueError.
    """
    path = Path(path)
    names: OrderedDict[str, str] = OrderedDict()
    for number, line in enumerate(read_lines(path), start=1):
        wnid, _, name = line.partition(" ")
        if not name:
            raise ValueError(f"{path}, line {number}: {line!r} must be a WNID, a space and a class name")
        if wnid in names:
            raise ValueError(f"{path}, line {number}: WNID {wnid} appears twice")
        names[wnid] = name
    return names


def read_lines(path: str | os.PathLike) -> list[str]:
    """Return the non-blank lines of a text file, stripped of surrounding whitespace."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------------------
# Class-name rules of the CoOp parsers, used by the check and by the fakes' tests.


def sorted_folder_classnames(
    folders: Iterable[str], ignored: Iterable[str] = (), renames: Mapping[str, str] | None = None
) -> list[str]:
    """Return class names by label for datasets labelled by sorted folder names.

    Folders are sorted case-sensitively (upper case first), ``ignored`` folders are
    dropped, labels are fixed, and only then are names replaced through ``renames``, so
    Caltech101's "Faces" keeps label 0 while becoming "face".
    """
    renames = renames or {}
    ignored = set(ignored)
    class_folders = sorted(folder for folder in folders if folder not in ignored)
    return [renames.get(folder, folder) for folder in class_folders]


def pets_classname(file_name: str) -> str:
    """Return the OxfordPets class of an image file: the stem without its trailing number, lower-cased."""
    stem = Path(file_name).stem
    return "_".join(stem.split("_")[:-1]).lower()


def cars_classname(meta_name: str) -> str:
    """Move the trailing year of a ``cars_meta.mat`` name to the front ("Audi TT RS Coupe 2012" -> "2012 Audi TT RS Coupe")."""
    words = meta_name.split(" ")
    return " ".join([words[-1]] + words[:-1])


def sun397_classname(class_path: str) -> str:
    """Turn a ``ClassName.txt`` entry such as "/a/apartment_building/outdoor" into "outdoor apartment_building"."""
    parts = class_path.strip().lstrip("/").split("/")[1:]
    return " ".join(reversed(parts))


def ucf101_classname(action: str) -> str:
    """Split a CamelCase UCF101 action at capital letters and join with "_" ("YoYo" -> "Yo_Yo")."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))
