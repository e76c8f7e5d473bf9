"""Fake datasets in each benchmark's exact CoOp layout, made of tiny JPEGs, for tests and offline notebooks.

``make_fake_dataset(name, root)`` writes ``<root>/<manifest.folder>`` with the folders,
split JSON and metadata files of the real dataset, so the loaders and the check read a
fake exactly as they read the real data. The metadata files are classnames.txt,
variants.txt and images_variant_*.txt, cat_to_name.json, ClassName.txt with the
partition lists, ucfTrainTestlist/ and the OxfordPets annotations.

Class names are synthetic except for the facts the manifests record: with the full
class count, the names at the known labels and at the base/novel boundary are the real
ones (Caltech101's label 49 is "helicopter"), and every fake keeps the dataset's naming
quirks (Caltech101's ignored and renamed folders, a slash in an FGVC variant, SUN397's
nested scene folders, UCF101's CamelCase actions, ImageNetV2's numeric folders).
Each class gets ``images_per_class`` images in every split.

A fake carries a ``CAPT_FAKE_DATASET.json`` record of its own sizes, which the check
compares with instead of the published sizes. NOTE: .mat files (Flowers102's
imagelabels.mat, StanfordCars' devkit) are not written because capt does not depend on
scipy; the loaders do not read them.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

from PIL import Image

from capt_lib.data.check import FAKE_RECORD
from capt_lib.data.manifest import Manifest, load_manifest

logger = logging.getLogger(__name__)

IMAGE_SIZE = 16  # side of the fake images, in pixels
SPLIT_ORDER = ("train", "val", "test")
IMAGENET_FIRST_WNID = ("n01440764", "tench")  # first line of ImageNet's classnames.txt
VARIANT_STRIDE = 5  # ImageNet-A/-R fakes keep every 5th WNID, so 200 of the 1,000 classes
EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")
EUROSAT_NAMES = ("Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                 "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
                 "River", "Sea or Lake")


def make_fake_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    images_per_class: int = 2,
    num_classes: int | None = None,
) -> Path:
    """Write a fake of benchmark ``name`` under ``root`` and return its dataset folder.

    ``num_classes`` defaults to the real class count, so a full ImageNet fake with one
    image per class is 2,000 JPEGs. Pass a smaller number, at least 2, for a quicker
    fake. Raises FileExistsError rather than write into an existing dataset folder.
    """
    manifest = load_manifest(name)
    num_classes = manifest.num_classes if num_classes is None else num_classes
    if not 2 <= num_classes <= manifest.num_classes:
        raise ValueError(f"num_classes={num_classes} is invalid for {manifest.name}; choose 2..{manifest.num_classes}")
    if images_per_class < 1:
        raise ValueError(f"images_per_class={images_per_class} is invalid; it must be at least 1")

    dataset_dir = manifest.dataset_dir(root)
    if dataset_dir.exists():
        raise FileExistsError(f"{dataset_dir} already exists; fakes are written only into new folders")
    dataset_dir.mkdir(parents=True)

    writer = _WRITERS[manifest.name]
    record = writer(_Fake(manifest, dataset_dir, num_classes, images_per_class))
    record.update(generator="capt_lib.data.fakes", name=manifest.name)
    _write_json(dataset_dir / FAKE_RECORD, record)
    logger.info("wrote a fake %s with %d classes to %s", manifest.name, num_classes, dataset_dir)
    return dataset_dir


class _Fake:
    """Writer context: the manifest, the dataset folder, the sizes and a JPEG encoder."""

    def __init__(self, manifest: Manifest, dataset_dir: Path, num_classes: int, images_per_class: int):
        self.manifest = manifest
        self.dir = dataset_dir
        self.n = num_classes
        self.per_class = images_per_class
        self.full = num_classes == manifest.num_classes

    def image(self, path: Path, label: int, index: int) -> None:
        """Write a JPEG whose colour encodes the label and whose brightness encodes the index."""
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = ((37 * label) % 256, (91 * label + 17 * index) % 256, (53 * label + 101) % 256)
        buffer = io.BytesIO()
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue())

    def plan(self, anchors_full: dict[int, str], anchors_always: dict[int, str], fill: Callable[[int, str], str]) -> list[str]:
        """Return ``n`` raw class names: anchors at their labels, ``fill(label, last anchor)`` elsewhere.

        ``anchors_always`` apply to every fake, ``anchors_full`` only with the full class
        count. A fill name built from the last anchor before it (e.g. "apple_pie_003")
        sorts between that anchor and the next, which keeps folder-sorted datasets in
        label order.
        """
        anchors = dict(anchors_always)
        if self.full:
            anchors.update(anchors_full)
        names = []
        last_anchor = ""
        for label in range(self.n):
            if label in anchors:
                last_anchor = anchors[label]
                names.append(last_anchor)
            else:
                names.append(fill(label, last_anchor))
        return names

    def split_counts(self) -> dict[str, int]:
        return {split: self.n * self.per_class for split in self.manifest.splits}

    def record(self, **extra) -> dict:
        return {"num_classes": self.n, "counts": self.split_counts(), **extra}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _suffix_fill(label: int, last_anchor: str) -> str:
    return f"{last_anchor}_{label:03d}"


def _write_split_json(fake: _Fake, entries: dict[str, list[list]]) -> None:
    _write_json(fake.dir / fake.manifest.split_file, {split: entries[split] for split in SPLIT_ORDER})


def _write_folder_dataset(fake: _Fake, folders: list[str], names: list[str], file_name: Callable[[str, int], str]) -> dict:
    """Write images/<folder>/<file> for datasets whose split JSON paths are "<folder>/<file>"."""
    image_dir = fake.dir / fake.manifest.image_dir
    entries: dict[str, list[list]] = {split: [] for split in SPLIT_ORDER}
    counter = 0
    for label, (folder, name) in enumerate(zip(folders, names)):
        for split in SPLIT_ORDER:
            for _ in range(fake.per_class):
                counter += 1
                relative = f"{folder}/{file_name(folder, counter)}"
                fake.image(image_dir / relative, label, counter)
                entries[split].append([relative, label, name])
    _write_split_json(fake, entries)
    return fake.record()


# -- one writer per dataset -----------------------------------------------------------------


def _caltech101(fake: _Fake) -> dict:
    class_folders = fake.plan(
        anchors_full={49: "helicopter", 50: "ibis"},
        anchors_always={0: "Faces", 1: "Leopards", 2: "Motorbikes", 3: "airplanes"},
        fill=_suffix_fill,
    )
    renames = fake.manifest.class_names.renames
    folders = sorted(class_folders)  # CoOp labels the case-sensitively sorted folders
    names = [renames.get(folder, folder) for folder in folders]
    record = _write_folder_dataset(fake, folders, names, lambda folder, i: f"image_{i:04d}.jpg")

    for ignored in fake.manifest.class_names.ignored_folders:  # present on disk, never in the split
        fake.image(fake.dir / fake.manifest.image_dir / ignored / "image_0001.jpg", 0, 0)
    return record


def _food101(fake: _Fake) -> dict:
    folders = sorted(fake.plan({50: "grilled_salmon", 51: "guacamole"}, {0: "apple_pie", 1: "baby_back_ribs"}, _suffix_fill))
    record = _write_folder_dataset(fake, folders, folders, lambda folder, i: f"{100000 + i}.jpg")
    _write_lines(fake.dir / "meta" / "classes.txt", folders)
    return record


def _dtd(fake: _Fake) -> dict:
    folders = sorted(fake.plan({23: "marbled", 24: "matted"}, {0: "banded", 1: "blotchy"}, _suffix_fill))
    return _write_folder_dataset(fake, folders, folders, lambda folder, i: f"{folder}_{i:04d}.jpg")


def _eurosat(fake: _Fake) -> dict:
    folders = list(EUROSAT_FOLDERS[: fake.n])
    names = list(EUROSAT_NAMES[: fake.n])
    return _write_folder_dataset(fake, folders, names, lambda folder, i: f"{folder}_{i}.jpg")


def _ucf101(fake: _Fake) -> dict:
    # YoYo is label 100 of the real list; smaller fakes put it at label 1 to keep the "Yo_Yo" case.
    yoyo_label = 100 if fake.full else 1
    actions = fake.plan(
        anchors_full={50: "LongJump", 51: "Lunges"},
        anchors_always={0: "ApplyEyeMakeup", yoyo_label: "YoYo"},
        fill=lambda label, last_anchor: f"FakeAction{label:03d}",
    )
    renamed = ["_".join(_camel_parts(action)) for action in actions]
    _write_lines(fake.dir / "ucfTrainTestlist" / "classInd.txt",
                 [f"{label + 1} {action}" for label, action in enumerate(actions)])

    image_dir = fake.dir / fake.manifest.image_dir
    entries: dict[str, list[list]] = {split: [] for split in SPLIT_ORDER}
    video_lists: dict[str, list[str]] = {"trainlist01.txt": [], "testlist01.txt": []}
    for label, (action, name) in enumerate(zip(actions, renamed)):
        for split in SPLIT_ORDER:
            for i in range(fake.per_class):
                group = SPLIT_ORDER.index(split) * fake.per_class + i + 1
                video = f"v_{action}_g{group:02d}_c01"
                fake.image(image_dir / name / f"{video}.jpg", label, group)
                entries[split].append([f"{name}/{video}.jpg", label, name])
                list_name = "testlist01.txt" if split == "test" else "trainlist01.txt"
                video_lists[list_name].append(f"{action}/{video}.avi" + ("" if split == "test" else f" {label + 1}"))
    for list_name, lines in video_lists.items():
        _write_lines(fake.dir / "ucfTrainTestlist" / list_name, lines)
    _write_split_json(fake, entries)
    return fake.record()


def _camel_parts(action: str) -> list[str]:
    """Split "ApplyEyeMakeup" into ["Apply", "Eye", "Makeup"] (written out here, independent of the loader's regex)."""
    parts: list[str] = []
    for char in action:
        if char.isupper() or not parts:
            parts.append(char)
        else:
            parts[-1] += char
    return parts


def _oxford_pets(fake: _Fake) -> dict:
    breeds = fake.plan(
        anchors_full={18: "keeshond", 19: "leonberger"},
        anchors_always={0: "Abyssinian", 1: "american_pit_bull_terrier"},
        fill=lambda label, last_anchor: f"breed_{label:03d}",
    )
    image_dir = fake.dir / fake.manifest.image_dir
    entries: dict[str, list[list]] = {split: [] for split in SPLIT_ORDER}
    annotations: dict[str, list[str]] = {"trainval.txt": [], "test.txt": []}
    breeds_seen = {1: 0, 2: 0}
    for label, breed in enumerate(breeds):
        species = 1 if breed[0].isupper() else 2  # annotation columns: class id, species (1 cat, 2 dog), breed id
        breeds_seen[species] += 1
        for split in SPLIT_ORDER:
            for i in range(fake.per_class):
                number = SPLIT_ORDER.index(split) * fake.per_class + i + 1
                stem = f"{breed}_{number}"
                fake.image(image_dir / f"{stem}.jpg", label, number)
                entries[split].append([f"{stem}.jpg", label, breed.lower()])
                list_name = "test.txt" if split == "test" else "trainval.txt"
                annotations[list_name].append(f"{stem} {label + 1} {species} {breeds_seen[species]}")
    for list_name, lines in annotations.items():
        _write_lines(fake.dir / "annotations" / list_name, lines)
    _write_split_json(fake, entries)
    return fake.record()


def _stanford_cars(fake: _Fake) -> dict:
    meta_names = fake.plan(
        anchors_full={97: "Eagle Talon Hatchback 1998", 98: "FIAT 500 Abarth 2012"},
        anchors_always={0: "AM General Hummer SUV 2000"},
        fill=lambda label, last_anchor: f"Fake Motors Model {label:03d} {1990 + label % 30}",
    )
    entries: dict[str, list[list]] = {split: [] for split in SPLIT_ORDER}
    numbers = {"cars_train": 0, "cars_test": 0}
    for label, meta_name in enumerate(meta_names):
        words = meta_name.split(" ")
        name = " ".join([words[-1]] + words[:-1])
        for split in SPLIT_ORDER:
            folder = "cars_test" if split == "test" else "cars_train"
            for _ in range(fake.per_class):
                numbers[folder] += 1
                relative = f"{folder}/{numbers[folder]:05d}.jpg"
                fake.image(fake.dir / relative, label, numbers[folder])
                entries[split].append([relative, label, name])
    _write_split_json(fake, entries)
    return fake.record()


def _oxford_flowers(fake: _Fake) -> dict:
    names = fake.plan(
        anchors_full={50: "petunia", 51: "wild pansy"},
        anchors_always={0: "pink primrose", 1: "hard-leaved pocket orchid"},
        fill=lambda label, last_anchor: f"fake flower {label:03d}",
    )
    _write_json(fake.dir / "cat_to_name.json", {str(label + 1): name for label, name in enumerate(names)})

    entries: dict[str, list[list]] = {split: [] for split in SPLIT_ORDER}
    number = 0
    for label, name in enumerate(names):
        for split in SPLIT_ORDER:
            for _ in range(fake.per_class):
                number += 1
                fake.image(fake.dir / "jpg" / f"image_{number:05d}.jpg", label, number)
                entries[split].append([f"image_{number:05d}.jpg", label, name])
    _write_split_json(fake, entries)
    return fake.record()


def _fgvc_aircraft(fake: _Fake) -> dict:
    variants = fake.plan(
        anchors_full={49: "Cessna 525", 50: "Cessna 560", 99: "Yak-42"},
        anchors_always={0: "707-320", 1: "F-16A/B"},
        fill=lambda label, last_anchor: f"Fake Jet {label:03d}",
    )
    _write_lines(fake.dir / "variants.txt", variants)
    image_id = 1_000_000
    for split in SPLIT_ORDER:
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(fake.per_class):
                image_id += 1
                fake.image(fake.dir / "images" / f"{image_id}.jpg", label, image_id)
                lines.append(f"{image_id} {variant}")
        _write_lines(fake.dir / f"images_variant_{split}.txt", lines)
    return fake.record()


def _sun397(fake: _Fake) -> dict:
    class_paths = fake.plan(
        anchors_full={198: "/i/ice_skating_rink/indoor", 199: "/i/ice_skating_rink/outdoor"},
        anchors_always={0: "/a/abbey", 1: "/a/apartment_building/outdoor", 2: "/b/bakery/shop"},
        fill=lambda label, last_anchor: f"/f/fake_scene_{label:03d}",
    )
    _write_lines(fake.dir / "ClassName.txt", class_paths)

    entries: dict[str, list[list]] = {split: [] for split in SPLIT_ORDER}
    partitions: dict[str, list[str]] = {"Training_01.txt": [], "Testing_01.txt": []}
    number = 0
    for label, class_path in enumerate(class_paths):
        parts = class_path.lstrip("/").split("/")
        name = " ".join(reversed(parts[1:]))  # drop the letter folder, put indoor/outdoor first
        for split in SPLIT_ORDER:
            for _ in range(fake.per_class):
                number += 1
                relative = f"{'/'.join(parts)}/sun_{number:016x}.jpg"
                fake.image(fake.dir / "SUN397" / relative, label, number)
                entries[split].append([relative, label, name])
                partitions["Testing_01.txt" if split == "test" else "Training_01.txt"].append(f"/{relative}")
    for list_name, lines in partitions.items():
        _write_lines(fake.dir / list_name, lines)
    _write_split_json(fake, entries)
    return fake.record()


def _imagenet_vocabulary(size: int) -> list[tuple[str, str]]:
    """Return ``size`` (WNID, name) pairs in sorted WNID order, starting with ImageNet's real first class."""
    first_number = int(IMAGENET_FIRST_WNID[0][1:])
    vocabulary = [IMAGENET_FIRST_WNID]
    vocabulary += [(f"n{first_number + 7 * k:08d}", f"imagenet class {k:04d}") for k in range(1, size)]
    return vocabulary


def _write_classnames(fake: _Fake, vocabulary: list[tuple[str, str]]) -> None:
    _write_lines(fake.dir / "classnames.txt", [f"{wnid} {name}" for wnid, name in vocabulary])


def _imagenet(fake: _Fake) -> dict:
    vocabulary = _imagenet_vocabulary(fake.n)
    _write_classnames(fake, vocabulary)
    number = 0
    for label, (wnid, _) in enumerate(vocabulary):
        for i in range(fake.per_class):
            fake.image(fake.dir / "images" / "train" / wnid / f"{wnid}_{i + 1}.JPEG", label, i)
            number += 1
            fake.image(fake.dir / "images" / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG", label, number)
    return fake.record(vocabulary_size=fake.n)


def _imagenetv2(fake: _Fake) -> dict:
    vocabulary = _imagenet_vocabulary(fake.n)
    _write_classnames(fake, vocabulary)
    for label in range(fake.n):
        for i in range(fake.per_class):
            fake.image(fake.dir / fake.manifest.image_dir / str(label) / f"{label:04d}{i:04d}abcdef.jpeg", label, i)
    return fake.record(vocabulary_size=fake.n)


def _imagenet_sketch(fake: _Fake) -> dict:
    vocabulary = _imagenet_vocabulary(fake.n)
    _write_classnames(fake, vocabulary)
    for label, (wnid, _) in enumerate(vocabulary):
        for i in range(fake.per_class):
            fake.image(fake.dir / "images" / wnid / f"sketch_{i + 1}.JPEG", label, i)
    return fake.record(vocabulary_size=fake.n)


def _imagenet_subset(fake: _Fake) -> dict:
    """ImageNet-A and -R: a 1,000-line classnames.txt (5 lines per class in smaller fakes) and every 5th WNID as a folder."""
    vocabulary_size = 1000 if fake.full else VARIANT_STRIDE * fake.n
    vocabulary = _imagenet_vocabulary(vocabulary_size)
    _write_classnames(fake, vocabulary)

    image_dir = fake.dir / fake.manifest.image_dir
    for label, (wnid, _) in enumerate(vocabulary[::VARIANT_STRIDE]):
        for i in range(fake.per_class):
            fake.image(image_dir / wnid / f"{i + 1:04d}.jpg", label, i)
    (image_dir / "README.txt").write_text("Fake README, skipped by the loader like the real one.\n", encoding="utf-8")
    return fake.record(vocabulary_size=vocabulary_size)


_WRITERS: dict[str, Callable[[_Fake], dict]] = {
    "caltech101": _caltech101,
    "dtd": _dtd,
    "eurosat": _eurosat,
    "fgvc_aircraft": _fgvc_aircraft,
    "food101": _food101,
    "imagenet": _imagenet,
    "imagenet_a": _imagenet_subset,
    "imagenet_r": _imagenet_subset,
    "imagenet_sketch": _imagenet_sketch,
    "imagenetv2": _imagenetv2,
    "oxford_flowers": _oxford_flowers,
    "oxford_pets": _oxford_pets,
    "stanford_cars": _stanford_cars,
    "sun397": _sun397,
    "ucf101": _ucf101,
}
