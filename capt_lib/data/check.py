"""Validate a prepared CoOp-format dataset against its manifest; the ``capt data`` commands.

``check_dataset(name, root)`` reports, line by line and with the fix for each:

* layout mistakes: a missing dataset folder, ``--root`` pointing at the dataset folder
  itself, a doubly nested folder (``caltech-101/caltech-101/101_ObjectCategories``),
  ImageNet validation images left flat instead of in WNID folders;
* a missing split JSON, with where it is published;
* split entries whose image does not exist, and (full check) images PIL cannot open;
* class and image counts that differ from the published split;
* class names that break the dataset's naming rule or differ from known names;
* ImageNet WNID folders that disagree with ``classnames.txt``.

The fast check (``full=False``) skips opening the images; the loaders in
``capt_lib.data.coop_datasets`` run it and reject a dataset that fails it.

A fake dataset written by ``capt_lib.data.fakes`` carries a ``CAPT_FAKE_DATASET.json``
record with its own class and image counts. The check compares a fake with that record
instead of the published sizes, and the report states that it did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image
from tqdm import tqdm

from capt_lib.data.coop_datasets import (
    SplitListing,
    list_class_folders,
    list_fgvc_split,
    list_split_json,
    pets_classname,
    read_classnames_txt,
    read_lines,
    sorted_folder_classnames,
    sun397_classname,
    ucf101_classname,
)
from capt_lib.data.manifest import FOLDER_LOADERS, Manifest, PrepareStep, list_datasets, load_manifest

logger = logging.getLogger(__name__)

FAKE_RECORD = "CAPT_FAKE_DATASET.json"  # written by capt_lib.data.fakes into a fake's dataset folder
MAX_EXAMPLES = 5  # paths or names quoted per issue
# Issue kinds that mean "a file or folder is not where it should be"; a loader rejecting
# a dataset with only these raises FileNotFoundError, otherwise ValueError.
PATH_KINDS = frozenset({"missing_root", "missing_dataset_folder", "wrong_root", "misnamed_folder",
                        "nested_folder", "missing_file", "missing_split_file", "missing_image"})


@dataclass(frozen=True)
class CheckIssue:
    severity: str  # "error": loaders reject the dataset; "warning": it loads but differs from the published benchmark; "note": not verified
    kind: str  # short tag such as "missing_image", for programs and tests
    message: str  # what is wrong and what to do


@dataclass(frozen=True)
class CheckReport:
    """The outcome of checking one dataset folder against its manifest."""

    name: str  # dataset name
    dataset_dir: Path  # the folder checked
    splits: tuple[str, ...]  # splits checked
    full: bool  # whether every image was opened
    issues: tuple[CheckIssue, ...]
    counts: Mapping[str, int]  # images listed per checked split
    classnames: tuple[str, ...]  # label space found, by label; empty when the items could not be listed
    fake: bool  # whether the folder is a fake written by capt_lib.data.fakes
    listings: Mapping[str, SplitListing] = field(default_factory=dict, repr=False, compare=False)

    @property
    def errors(self) -> list[CheckIssue]:
        return [issue for issue in self.issues if issue.severity == "error"]

    @property
    def warnings(self) -> list[CheckIssue]:
        return [issue for issue in self.issues if issue.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and notes do not block loading)."""
        return not self.errors

    def format(self) -> str:
        """Return the report as text: a header, one paragraph per issue, then the verdict."""
        lines = [f"capt data check {self.name}: {self.dataset_dir}"]
        if self.fake:
            lines.append(f"  fake dataset written by capt_lib.data.fakes: sizes are compared with its {FAKE_RECORD}")
        for issue in self.issues:
            lines.append(f"{issue.severity.upper():7s} [{issue.kind}] {issue.message}")

        if self.counts:
            sizes = ", ".join(f"{split} {count:,}" for split, count in self.counts.items())
            opened = "every image opened" if self.full else "images not opened (fast check)"
            lines.append(f"checked: {sizes} images; {len(self.classnames)} classes; {opened}")
        n_errors, n_warnings = len(self.errors), len(self.warnings)
        if n_errors:
            lines.append(f"result: {n_errors} error(s), {n_warnings} warning(s); "
                         "the loaders reject this dataset until the errors are fixed")
        elif n_warnings:
            lines.append(f"result: usable, {n_warnings} warning(s); results may not be comparable with published ones")
        else:
            lines.append("result: OK")
        return "\n".join(lines)


def check_dataset(
    name: str, root: str | os.PathLike, *, full: bool = True, splits: Sequence[str] | None = None
) -> CheckReport:
    """Check dataset ``name`` under the data folder ``root`` (the folder containing ``<manifest.folder>``).

    ``full=True`` also opens every image of the checked splits with PIL; ``splits``
    defaults to all splits the dataset provides.
    """
    return inspect_dataset(load_manifest(name), root, splits=splits, full=full)


def inspect_dataset(
    manifest: Manifest, root: str | os.PathLike, *, splits: Sequence[str] | None = None, full: bool = True
) -> CheckReport:
    """Check a dataset described by ``manifest``; the report keeps the split listings for the loaders."""
    splits = tuple(splits) if splits is not None else manifest.splits
    invalid = [split for split in splits if split not in manifest.splits]
    if invalid:
        raise ValueError(f"{manifest.name} has no split(s) {invalid}; valid splits are {list(manifest.splits)}")
    return _Inspection(manifest, Path(root).expanduser(), splits, full).run()


def rejection_error(report: CheckReport) -> Exception:
    """Build the exception a loader raises for a failed check, with the report as its message."""
    if all(issue.kind in PATH_KINDS for issue in report.errors):
        return FileNotFoundError(report.format())
    return ValueError(report.format())


class _Inspection:
    """One run of the check; collects issues while it walks from layout to image contents."""

    def __init__(self, manifest: Manifest, root: Path, splits: tuple[str, ...], full: bool):
        self.manifest = manifest
        self.root = root
        self.dataset_dir = manifest.dataset_dir(root)
        self.splits = splits
        self.full = full
        self.issues: list[CheckIssue] = []
        self.listings: dict[str, SplitListing] = {}
        self.classnames: tuple[str, ...] = ()
        self.fake_record: dict | None = None

    def add(self, severity: str, kind: str, message: str) -> None:
        self.issues.append(CheckIssue(severity, kind, message))

    def run(self) -> CheckReport:
        if self._check_layout() and self._list_items():
            self._check_label_space()
            self._check_counts()
            self._check_names()
            self._check_images_exist()
            if self.full:
                self._check_images_readable()
        return CheckReport(
            name=self.manifest.name,
            dataset_dir=self.dataset_dir,
            splits=self.splits,
            full=self.full,
            issues=tuple(self.issues),
            counts={split: len(self.listings[split].paths) for split in self.splits if split in self.listings},
            classnames=self.classnames,
            fake=self.fake_record is not None,
            listings=self.listings,
        )

    # -- layout ---------------------------------------------------------------------------

    def _check_layout(self) -> bool:
        """Check folders and required files; return False when the items cannot be listed."""
        if not self.root.is_dir():
            self.add("error", "missing_root", f"the data root {self.root} does not exist or is not a folder")
            return False
        if not self.dataset_dir.is_dir():
            self._explain_missing_dataset_folder()
            return False

        self._read_fake_record()
        nested: dict[Path, list[str]] = {}
        for required in self.manifest.required:
            if not (self.dataset_dir / required).exists():
                holder = self._explain_missing(required)
                if holder is not None:
                    nested.setdefault(holder, []).append(required)
        for holder, entries in nested.items():
            levels = len(holder.relative_to(self.dataset_dir).parts)
            how_far = "up one level" if levels == 1 else f"up {levels} levels"
            self.add("error", "nested_folder",
                     f"{', '.join(entries)} {'is' if len(entries) == 1 else 'are'} not in {self.dataset_dir} but in "
                     f"{holder}; move the contents of {holder} {how_far}, into {self.dataset_dir}")
        self._find_self_nesting()
        if self.manifest.loader in FOLDER_LOADERS and not self.issues_with("error"):
            self._find_flat_images()
        return not self.issues_with("error")

    def issues_with(self, severity: str) -> list[CheckIssue]:
        return [issue for issue in self.issues if issue.severity == severity]

    def _explain_missing_dataset_folder(self) -> None:
        manifest = self.manifest
        if self.root.name == manifest.folder or any((self.root / required).exists() for required in manifest.required):
            self.add("error", "wrong_root",
                     f"--root {self.root} is the dataset folder itself; pass its parent {self.root.parent}, "
                     f"the folder that contains {manifest.folder}/ (as CoOp's --root does)")
            return

        expected_names = (_simplify(manifest.folder), _simplify(manifest.coop_name))
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and _simplify(entry.name) in expected_names:
                self.add("error", "misnamed_folder",
                         f"{self.dataset_dir} does not exist but {entry} does; rename it to {manifest.folder}/, "
                         "the folder name the CoOp parsers use")
                return
        self.add("error", "missing_dataset_folder",
                 f"{self.dataset_dir} does not exist; run `capt data prepare {manifest.name} --root {self.root}` "
                 "for the preparation steps")

    def _explain_missing(self, required: str) -> Path | None:
        """Report a missing required entry, or return the wrapper folder it sits in one or two levels down."""
        holder = _find_deeper(self.dataset_dir, required)
        if holder is not None and str(holder.relative_to(self.dataset_dir)) in self.manifest.required:
            self.add("error", "missing_file",
                     f"{required} is in {holder} instead of {self.dataset_dir}; move it up into {self.dataset_dir}")
        elif holder is not None:
            return holder
        elif required == self.manifest.split_file:
            self._explain_missing_split_file()
        else:
            self.add("error", "missing_file",
                     f"{self.dataset_dir / required} is missing; run `capt data prepare {self.manifest.name}` "
                     "for the preparation steps")
        return None

    def _explain_missing_split_file(self) -> None:
        manifest = self.manifest
        source = manifest.split_source
        mirrors = f"; {', '.join(source.mirrors)} also ships it" if source.mirrors else ""
        self.add("error", "missing_split_file",
                 f"{self.dataset_dir / manifest.split_file} is missing. It is published as Google Drive file "
                 f"{source.google_drive_id} ({source.url}), linked from CoOp's DATASETS.md{mirrors}. "
                 "Do not let CoOp-style code build a new random split in its place: numbers measured on "
                 "another split are not comparable with published results")

    def _find_self_nesting(self) -> None:
        """Report a required folder that contains a folder of its own name (eurosat/2750/2750/...)."""
        reported = {issue.message for issue in self.issues}
        for required in self.manifest.required:
            folder = self.dataset_dir / required
            inner = folder / folder.name
            if folder.is_dir() and inner.is_dir():
                message = (f"{inner} repeats its parent's name, so the files the loader looks for sit one level "
                           f"too deep; move the contents of {inner} up one level, into {folder}")
                if message not in reported:
                    self.add("error", "nested_folder", message)

    def _find_flat_images(self) -> None:
        """Report images or class archives lying directly in a folder that must hold one folder per class."""
        class_roots = {self.manifest.split_dirs.get(split, ".") for split in self.splits}
        for split_dir in sorted(class_roots):
            class_root = self.dataset_dir / self.manifest.image_dir / split_dir
            files = [entry.name for entry in os.scandir(class_root) if entry.is_file() and not entry.name.startswith(".")]
            images = [name for name in files if name.lower().endswith((".jpeg", ".jpg", ".png"))]
            archives = [name for name in files if name.lower().endswith(".tar")]

            if images and self.manifest.name == "imagenet" and split_dir == "val":
                self.add("error", "flat_imagenet_val",
                         f"{class_root} holds {len(images):,} images directly (e.g. {images[0]}) instead of one folder "
                         "per WNID; sort them into images/val/<wnid>/ using the ILSVRC-2012 validation labels, "
                         "because the loader lists only the WNID folders and would see no images")
            elif images:
                self.add("error", "flat_images",
                         f"{class_root} holds {len(images):,} images directly (e.g. {images[0]}); they belong in "
                         "one folder per class")
            if archives:
                self.add("error", "unextracted_archives",
                         f"{class_root} holds {len(archives):,} .tar files (e.g. {archives[0]}); extract each into a "
                         "folder of the same name and delete the archives")

    def _read_fake_record(self) -> None:
        path = self.dataset_dir / FAKE_RECORD
        if not path.is_file():
            return
        try:
            self.fake_record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            self.add("error", "invalid_file", f"{path} is not valid JSON ({e}); delete the fake and write it again")

    # -- listing --------------------------------------------------------------------------

    def _list_items(self) -> bool:
        """List the checked splits from the dataset's files; return False when they cannot be read."""
        manifest = self.manifest
        try:
            if manifest.loader == "split_json":
                all_splits = list_split_json(manifest, self.dataset_dir)
                self.listings = {split: all_splits[split] for split in self.splits}
                self.classnames = self._classnames_from_entries(all_splits)
            elif manifest.loader == "fgvc_variants":
                self.listings = {split: list_fgvc_split(manifest, self.dataset_dir, split) for split in self.splits}
                self.classnames = self.listings[self.splits[0]].classnames
            else:
                return self._list_class_folders()
        except (ValueError, OSError) as e:
            self.add("error", "invalid_file", f"{e}; restore the file from its official source")
            return False
        return not self.issues_with("error")

    def _list_class_folders(self) -> bool:
        manifest = self.manifest
        wnid_names = read_classnames_txt(self.dataset_dir / manifest.classnames_file)
        self._check_classnames_file(wnid_names)
        for split in self.splits:
            self._check_class_folders(split, wnid_names)
        if self.issues_with("error"):
            return False

        self.listings = {split: list_class_folders(manifest, self.dataset_dir, split, wnid_names) for split in self.splits}
        label_spaces = {split: listing.classnames for split, listing in self.listings.items()}
        self.classnames = label_spaces[self.splits[0]]
        if len(set(label_spaces.values())) > 1:
            self.add("error", "wnid_mismatch",
                     f"the splits {list(label_spaces)} have different class folders, so their labels disagree")
        return True

    def _classnames_from_entries(self, listings: Mapping[str, SplitListing]) -> tuple[str, ...]:
        """Build the label space of a split JSON and report labels with two names, gaps and repeated names."""
        names_of: dict[int, set[str]] = {}
        for listing in listings.values():
            for label, name in zip(listing.labels, listing.names):
                names_of.setdefault(label, set()).add(name)

        split_file = self.manifest.split_file
        conflicts = {label: sorted(names) for label, names in names_of.items() if len(names) > 1}
        if conflicts:
            examples = dict(sorted(conflicts.items())[:MAX_EXAMPLES])
            self.add("error", "label_name_conflict",
                     f"{split_file} gives {len(conflicts)} label(s) more than one class name, e.g. {examples}; "
                     "the file is corrupt or edited, so download it again")
        n_labels = max(names_of) + 1 if names_of else 0
        gaps = [label for label in range(n_labels) if label not in names_of]
        if gaps:
            self.add("error", "label_gap",
                     f"{split_file} has no entries for labels {gaps[:MAX_EXAMPLES]}{' ...' if len(gaps) > MAX_EXAMPLES else ''} "
                     f"below its largest label {n_labels - 1}; labels must be 0..n-1")
            return ()

        classnames = tuple(sorted(names_of[label])[0] for label in range(n_labels))
        repeated = sorted({name for name in classnames if classnames.count(name) > 1})
        if repeated:
            self.add("error", "duplicate_classname",
                     f"{split_file} uses the class name(s) {repeated[:MAX_EXAMPLES]} for more than one label")
        return classnames

    def _check_classnames_file(self, wnid_names: Mapping[str, str]) -> None:
        manifest = self.manifest
        path = self.dataset_dir / manifest.classnames_file
        expected = self._expected("vocabulary_size", manifest.vocabulary_size)
        if len(wnid_names) != expected:
            self.add("error", "wnid_mismatch",
                     f"{path} has {len(wnid_names)} WNIDs, expected {expected}; copy imagenet/classnames.txt, "
                     "which lists all 1,000 ImageNet classes")
        if list(wnid_names) != sorted(wnid_names):
            self.add("error", "wnid_mismatch",
                     f"{path} is not in sorted WNID order; the labels of ImageNetV2 and the ImageNet label order "
                     "rely on that order, so restore the original file")

    def _check_class_folders(self, split: str, wnid_names: Mapping[str, str]) -> None:
        """Compare the class folders of ``split`` with classnames.txt."""
        manifest = self.manifest
        class_root = self.dataset_dir / manifest.image_dir / manifest.split_dirs.get(split, ".")
        folders = sorted(entry.name for entry in os.scandir(class_root) if entry.is_dir() and not entry.name.startswith("."))

        if manifest.loader == "numeric_folders":
            valid = {str(number) for number in range(len(wnid_names))}
            unexpected = [folder for folder in folders if folder not in valid]
            missing = sorted(valid - set(folders), key=int)
            if unexpected:
                self.add("error", "wnid_mismatch",
                         f"{class_root} has folders that are not class numbers 0..{len(wnid_names) - 1}: "
                         f"{unexpected[:MAX_EXAMPLES]}")
            if missing:
                self.add("error", "wnid_mismatch",
                         f"{class_root} lacks the class folders {missing[:MAX_EXAMPLES]} ({len(missing)} in all)")
            return

        unknown = [folder for folder in folders if folder not in wnid_names]
        if unknown:
            self.add("error", "wnid_mismatch",
                     f"{class_root} has {len(unknown)} folder(s) that are not WNIDs of {manifest.classnames_file}: "
                     f"{unknown[:MAX_EXAMPLES]}")
        if manifest.loader == "imagenet":
            missing = [wnid for wnid in wnid_names if wnid not in set(folders)]
            if missing:
                self.add("error", "wnid_mismatch",
                         f"{class_root} lacks the WNID folders {missing[:MAX_EXAMPLES]} ({len(missing)} in all) that "
                         f"{manifest.classnames_file} lists; the folders must equal its 1,000 WNIDs")

    # -- sizes ----------------------------------------------------------------------------

    def _expected(self, key: str, published):
        """Return the expected value of ``key``: the fake's record for a fake, else the published value."""
        if self.fake_record is not None and key in self.fake_record:
            return self.fake_record[key]
        return published

    def _severity(self, dotted_field: str) -> str:
        return "error" if self.manifest.is_confirmed(dotted_field) or self.fake_record is not None else "warning"

    def _check_label_space(self) -> None:
        manifest = self.manifest
        expected = self._expected("num_classes", manifest.num_classes)
        if self.classnames and len(self.classnames) != expected:
            source = f"its {FAKE_RECORD}" if self.fake_record else manifest.source_of("num_classes")
            self.add(self._severity("num_classes"), "class_count",
                     f"found {len(self.classnames)} classes, expected {expected} ({source})")

    def _check_counts(self) -> None:
        for split, listing in self.listings.items():
            expected = self._expected("counts", self.manifest.counts)[split]
            found = len(listing.paths)
            if found == expected:
                continue
            if self.fake_record is not None:
                source = f"its {FAKE_RECORD}"
            else:
                unconfirmed = "" if self.manifest.is_confirmed(f"counts.{split}") else "; that number is unconfirmed"
                source = f"the published split, per {self.manifest.source_of(f'counts.{split}')}{unconfirmed}"
            self.add(self._severity(f"counts.{split}"), "split_count",
                     f"split {split!r} has {found:,} images, expected {expected:,} ({source})")

    # -- names ----------------------------------------------------------------------------

    def _check_names(self) -> None:
        if not self.classnames:
            return
        rule = self.manifest.class_names.rule
        check = getattr(self, f"_check_rule_{rule}", None)
        if check is not None:
            check()
        self._check_known_names()

    def _mismatch(self, expected: Sequence[str], what: str) -> None:
        """Compare the label space with ``expected`` names by label and report the differences."""
        found = self.classnames
        if len(expected) != len(found):
            self.add("error", "classname_mismatch",
                     f"{what} gives {len(expected)} classes but the split has {len(found)}")
            return
        wrong = [(label, found[label], expected[label]) for label in range(len(found)) if found[label] != expected[label]]
        if wrong:
            examples = "; ".join(f"label {label} is {got!r}, expected {want!r}" for label, got, want in wrong[:MAX_EXAMPLES])
            self.add("error", "classname_mismatch", f"{len(wrong)} class name(s) differ from {what}: {examples}")

    def _image_folders(self) -> list[str]:
        image_dir = self.dataset_dir / self.manifest.image_dir
        return [entry.name for entry in os.scandir(image_dir) if entry.is_dir() and not entry.name.startswith(".")]

    def _check_rule_sorted_folders(self) -> None:
        rule = self.manifest.class_names
        expected = sorted_folder_classnames(self._image_folders(), rule.ignored_folders, rule.renames)
        self._mismatch(expected, f"the sorted folders of {self.manifest.image_dir}/ (CoOp's naming rule)")

    def _check_rule_pets_file_stem(self) -> None:
        wrong = []
        for listing in self.listings.values():
            for path, name in zip(listing.paths, listing.names):
                if pets_classname(path) != name:
                    wrong.append(f"{os.path.basename(path)} is labelled {name!r}, expected {pets_classname(path)!r}")
        if wrong:
            self.add("error", "classname_mismatch",
                     f"{len(wrong)} entries break the rule 'file stem without its number, lower-cased': "
                     + "; ".join(wrong[:MAX_EXAMPLES]))

    def _check_rule_cars_year_first(self) -> None:
        wrong = [name for name in self.classnames if not re.match(r"^\d{4} \S", name)]
        if wrong:
            self.add("error", "classname_mismatch",
                     f"{len(wrong)} class name(s) do not start with the model year, e.g. {wrong[:MAX_EXAMPLES]}; "
                     "CoOp moves the year of the cars_meta.mat name to the front")
        self.add("note", "names_not_verified",
                 "class names were not compared with devkit/cars_meta.mat because capt does not read .mat files")

    def _check_rule_cat_to_name(self) -> None:
        path = self.dataset_dir / "cat_to_name.json"
        if not path.is_file():
            self.add("note", "names_not_verified", f"{path} is absent, so class names were not compared with it")
            return
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            self.add("error", "invalid_file", f"{path} is not valid JSON ({e}); download it again")
            return
        expected = [names.get(str(label + 1), "<missing>") for label in range(len(self.classnames))]
        self._mismatch(expected, "cat_to_name.json (label + 1 -> name)")

    def _check_rule_sun397_path(self) -> None:
        path = self.dataset_dir / "ClassName.txt"
        if not path.is_file():
            self.add("note", "names_not_verified", f"{path} is absent, so class names and order were not verified")
            return
        self._mismatch([sun397_classname(line) for line in read_lines(path)], "ClassName.txt (CoOp's SUN397 rule)")

    def _check_rule_camel_case_split(self) -> None:
        wrong = [name for name in self.classnames if ucf101_classname(name.replace("_", "")) != name]
        if wrong:
            self.add("error", "classname_mismatch",
                     f"{len(wrong)} class name(s) are not CamelCase actions split at capitals and joined by '_': "
                     f"{wrong[:MAX_EXAMPLES]}")
        folders = set(self._image_folders())
        absent = sorted(set(self.classnames) - folders)
        if absent:
            self.add("error", "classname_mismatch",
                     f"{self.manifest.image_dir}/ has no folders for the classes {absent[:MAX_EXAMPLES]}")

        class_index = self.dataset_dir / "ucfTrainTestlist" / "classInd.txt"
        if class_index.is_file():
            actions = [line.split(" ", 1)[1] for line in read_lines(class_index)]
            self._mismatch([ucf101_classname(action) for action in actions], "ucfTrainTestlist/classInd.txt")
        else:
            self.add("note", "names_not_verified", f"{class_index} is absent, so the label order was not verified")

    def _check_known_names(self) -> None:
        """Compare names at labels with known facts, when the label space has the published size."""
        manifest = self.manifest
        if len(self.classnames) != manifest.num_classes:
            if self.fake_record is None:
                return
            self.add("note", "names_not_verified",
                     f"the fake has {len(self.classnames)} of {manifest.num_classes} classes, so the names at "
                     "known labels were not compared")
            return

        known = dict(manifest.class_names.known)
        if manifest.base_novel is not None:
            for label, name in ((manifest.base_novel.num_base - 1, manifest.base_novel.last_base),
                                (manifest.base_novel.num_base, manifest.base_novel.first_novel)):
                if name is not None:
                    known[label] = name
        wrong = [(label, name) for label, name in sorted(known.items()) if self.classnames[label] != name]
        for label, name in wrong:
            self.add("error", "classname_mismatch",
                     f"label {label} is {self.classnames[label]!r} but the published label order has {name!r} there "
                     f"({manifest.source_of('class_names')}); the class order differs from CoOp's")

    # -- images ---------------------------------------------------------------------------

    def _check_images_exist(self) -> None:
        if self.manifest.loader in FOLDER_LOADERS:
            return  # the items were listed from the files themselves
        source = self.manifest.split_file or "the split lists"
        for split, listing in self.listings.items():
            missing = [path for path in listing.paths if not (self.dataset_dir / path).is_file()]
            if missing:
                examples = ", ".join(missing[:MAX_EXAMPLES]) + (" ..." if len(missing) > MAX_EXAMPLES else "")
                self.add("error", "missing_image",
                         f"{len(missing):,} of {len(listing.paths):,} images listed for split {split!r} in {source} "
                         f"do not exist under {self.dataset_dir}: {examples}; restore them from the official archive")

    def _check_images_readable(self) -> None:
        listed = {path for listing in self.listings.values() for path in listing.paths}
        paths = sorted(path for path in listed if (self.dataset_dir / path).is_file())  # missing ones are reported already
        unreadable = []
        for path in tqdm(paths, desc=f"{self.manifest.name}: opening images", unit="img", leave=False):
            try:
                # NOTE: verify() parses the file structure without decoding pixels, so a JPEG cut
                # short after its header can still pass.
                with Image.open(self.dataset_dir / path) as image:
                    image.verify()
            except (OSError, SyntaxError, ValueError) as e:
                unreadable.append(f"{path} ({type(e).__name__}: {e})")
        if unreadable:
            self.add("error", "unreadable_image",
                     f"{len(unreadable):,} of {len(paths):,} images cannot be read by PIL: "
                     + "; ".join(unreadable[:MAX_EXAMPLES]) + "; download them again")


def _simplify(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _find_deeper(dataset_dir: Path, required: str, max_depth: int = 2) -> Path | None:
    """Return the folder one or two levels below ``dataset_dir`` that contains ``required``, or None."""
    level = [dataset_dir]
    for _ in range(max_depth):
        level = [child for folder in level for child in _subfolders(folder)]
        for folder in level:
            if (folder / required).exists():
                return folder
    return None


def _subfolders(folder: Path, limit: int = 50) -> list[Path]:
    """Return up to ``limit`` sub-folders: enough for archive wrappers, and bounded inside large image folders."""
    found = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.is_dir() and not entry.name.startswith("."):
            found.append(Path(entry.path))
            if len(found) == limit:
                break
    return found


# ---------------------------------------------------------------------------------------
# capt data prepare


def manual_steps_text(manifest: Manifest) -> str:
    """Return the manifest's preparation steps and download sources as text for a person."""
    lines = [f"Preparing {manifest.title} ({manifest.name}) under your data root, as {manifest.folder}/:"]
    lines += [f"  {number}. {step}" for number, step in enumerate(manifest.manual_steps, start=1)]
    lines.append("Sources:")
    for download in manifest.downloads:
        note = f" ({download.note})" if download.note else ""
        lines.append(f"  - {download.description}: {download.url} [{download.status}]{note}")
    if manifest.split_source is not None:
        lines.append(f"  - {manifest.split_file}: {manifest.split_source.url}")
        lines += [f"  - {manifest.split_file} mirror: {mirror}" for mirror in manifest.split_source.mirrors]
    lines.append(f"Then run: capt data check {manifest.name} --root <data root>")
    return "\n".join(lines)


def run_prepare_steps(manifest: Manifest, root: str | os.PathLike) -> list[str]:
    """Download and unpack the manifest's scripted sources into the dataset folder; return what was done.

    Call this only on a user's explicit request (``capt data prepare --allow-download``).
    A step whose target already exists is skipped. Sizes and SHA-256 checksums are
    verified where the manifest gives them. Raises ValueError when the dataset has no
    scripted steps and RuntimeError when a download or an archive fails.
    """
    if not manifest.prepare_steps:
        raise ValueError(f"{manifest.name} cannot be prepared by a script; follow the manual steps")
    dataset_dir = manifest.dataset_dir(root)
    dataset_dir.mkdir(parents=True, exist_ok=True)

    done = []
    for step in manifest.prepare_steps:
        target = dataset_dir / step.target
        if step.target != "." and target.exists():
            done.append(f"skipped {step.url}: {target} already exists")
            continue
        download = _download(step, dataset_dir)
        _unpack(step, download, dataset_dir)
        done.append(f"fetched {step.url} into {target}")
        logger.info("prepared %s: %s -> %s", manifest.name, step.url, target)
    return done


def _download(step: PrepareStep, dataset_dir: Path) -> Path:
    """Fetch ``step.url`` into the dataset folder and verify its size and checksum where known."""
    path = dataset_dir / step.file
    partial = dataset_dir / f".{step.file}.part"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(step.url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=step.file) as progress:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"download of {step.url} failed: {e}") from e

    size = partial.stat().st_size
    if step.size is not None and size != step.size:
        partial.unlink()
        raise RuntimeError(f"{step.url} gave {size:,} bytes, expected {step.size:,}; the download is incomplete or changed")
    if step.sha256 is not None and digest.hexdigest() != step.sha256.lower():
        partial.unlink()
        raise RuntimeError(f"{step.url} has SHA-256 {digest.hexdigest()}, expected {step.sha256}")
    if step.size is None and step.sha256 is None:
        logger.warning("%s: no size or checksum is known, so the download was not verified", step.url)
    os.replace(partial, path)
    return path


def _unpack(step: PrepareStep, download: Path, dataset_dir: Path) -> None:
    """Move the download to its target, or extract it and move the archive member's contents there."""
    target = dataset_dir / step.target
    if step.member is None:
        os.replace(download, target)
        return

    staging = dataset_dir / f".capt_prepare_{download.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _extract(download, staging)
        member = staging / step.member
        if not member.is_dir():
            top = sorted(path.name for path in staging.iterdir())
            raise RuntimeError(f"{download.name} has no folder {step.member}; its top-level entries are {top}")
        target.mkdir(parents=True, exist_ok=True)
        for child in sorted(member.iterdir()):
            if (target / child.name).exists():
                raise RuntimeError(f"{target / child.name} already exists; remove it or move it aside, then rerun")
            shutil.move(str(child), str(target / child.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    download.unlink()


def _extract(archive: Path, destination: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(destination)  # zipfile drops absolute paths and ".." components
        return
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("extracting archives safely needs a Python with tarfile filters (3.10.12+, 3.11.4+ or 3.12+)")
    try:
        with tarfile.open(archive) as handle:
            handle.extractall(destination, filter="data")
    except tarfile.TarError as e:
        raise RuntimeError(f"{archive} is not a readable tar or zip archive: {e}") from e


# ---------------------------------------------------------------------------------------
# Command line: capt data check / capt data prepare


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command (``check`` and ``prepare``) to the subparsers of the ``capt`` parser."""
    data = subparsers.add_parser("data", help="check or prepare the CoOp-format benchmark datasets")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    check = actions.add_parser("check", help="validate prepared datasets against their manifests")
    check.add_argument("names", nargs="+", metavar="NAME",
                       help="dataset name(s) from data_manifests/ (e.g. caltech101), or 'all' for every prepared one")
    check.add_argument("--root", type=Path, required=True,
                       help="data root that contains the dataset folders, e.g. DATA for DATA/caltech-101")
    check.add_argument("--fast", action="store_true",
                       help="skip opening every image; check layout, split entries, counts and names only")

    prepare = actions.add_parser("prepare", help="print the preparation steps, or download where a script can")
    prepare.add_argument("name", metavar="NAME", help="dataset name")
    prepare.add_argument("--root", type=Path, required=True, help="data root the dataset folder goes into")
    prepare.add_argument("--allow-download", action="store_true",
                         help="download and unpack the official archives where the manifest scripts them")

    data.set_defaults(handler=run_data_command)
    return data


def run_data_command(args: argparse.Namespace) -> int:
    """Run ``capt data check`` or ``capt data prepare``; return 0 on success and 1 when a dataset fails."""
    if args.data_command == "check":
        return _check_command(args.names, args.root, full=not args.fast)
    return _prepare_command(args.name, args.root, args.allow_download)


def _check_command(names: list[str], root: Path, full: bool) -> int:
    check_all = names == ["all"]
    manifests = [load_manifest(name) for name in (list_datasets() if check_all else names)]

    failed = 0
    for manifest in manifests:
        if check_all and not manifest.dataset_dir(root).is_dir():
            print(f"capt data check {manifest.name}: not prepared ({manifest.dataset_dir(root)} does not exist)")
            continue
        report = inspect_dataset(manifest, root, full=full)
        print(report.format())
        failed += not report.ok
    return 1 if failed else 0


def _prepare_command(name: str, root: Path, allow_download: bool) -> int:
    manifest = load_manifest(name)
    if not allow_download:
        if manifest.prepare_steps:
            print(f"{manifest.name}: `capt data prepare {manifest.name} --root {root} --allow-download` can fetch "
                  f"{len(manifest.prepare_steps)} official file(s); the other steps are manual.")
        print(manual_steps_text(manifest))
        return 0
    if not manifest.prepare_steps:
        print(f"{manifest.name}: the official sources cannot be fetched by a script; nothing was downloaded.",
              file=sys.stderr)
        print(manual_steps_text(manifest))
        return 1

    for line in run_prepare_steps(manifest, root):
        print(line)
    report = inspect_dataset(manifest, root, full=False)
    print(report.format())
    if not report.ok:
        print(manual_steps_text(manifest))
    return 0 if report.ok else 1
