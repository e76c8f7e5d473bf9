"""Dataset manifests: layout, split sizes, class-name rules and sources of each CoOp-format benchmark.

Each of the 15 benchmarks has one YAML file in ``data_manifests/`` at the repository
root. A manifest records where the dataset lives under the data root (the CoOp folder
name) and which files the loader reads. It also records the class and image counts of
each split, the base and novel labels, the prompt template and the class-name rules,
and finally the download sources and the manual preparation steps. Every fact names its source in ``sources``,
keyed by field; facts not checked against a primary source are listed in
``unconfirmed`` with the reason.

Field reference (all paths are relative to the dataset folder ``<root>/<folder>``):

    name                     capt's dataset name, equal to the file stem (e.g. caltech101)
    coop_name                DATASET.NAME in CoOp-family configs and the CUSTOM_TEMPLATES key
    title                    display name
    folder                   sub-folder of the data root
    image_dir                folder the images (or class folders) live in
    loader                   one of LOADERS: how the items of a split are listed
    splits                   splits the dataset provides (test only for the ImageNet variants)
    split_dirs               imagenet only: split -> folder under image_dir
    split_file               CoOp split JSON, or null when the dataset has none
    split_paths_relative_to  "image_dir" or "folder": what the split JSON paths are relative to
    required                 files and folders the loader reads
    metadata_files           optional files the check reads to verify class names
    classnames_file          ImageNet family: WNID -> name file (classnames.txt)
    vocabulary_size          ImageNet family: number of lines in classnames_file
    num_classes              number of classes in the label space
    counts                   images per split in the published split
    label_order              how labels 0..n-1 are assigned (text)
    base_novel               num_base = ceil(n/2), and the names at labels num_base-1 and num_base
    template                 hand-crafted prompt with one {} slot
    class_names              rule (one of NAME_RULES), ignored_folders, renames, known label -> name facts
    downloads                official sources: description, url, status (one of DOWNLOAD_STATUSES), note
    split_source             Google Drive id of the split JSON and mirrors that ship it
    prepare                  scripted download steps (url, file, member, target, size, sha256) and manual steps
    sources                  field -> where the fact comes from
    unconfirmed              dotted field -> why the fact is not confirmed
    notes                    free-text remarks
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

MANIFEST_DIR = Path(__file__).resolve().parents[2] / "data_manifests"
SPLITS = ("train", "val", "test")
LOADERS = ("split_json", "fgvc_variants", "imagenet", "numeric_folders", "wnid_folders")
NAME_RULES = (
    "sorted_folders",  # folder names sorted case-sensitively, minus ignored_folders, then renames
    "pets_file_stem",  # image file stem without its trailing number, lower-cased
    "cars_year_first",  # cars_meta.mat name with the trailing year moved to the front
    "cat_to_name",  # cat_to_name.json entry of the 1-based label
    "variants_verbatim",  # variants.txt lines as they are
    "sun397_path",  # ClassName.txt path without its letter folder, parts reversed and joined by spaces
    "camel_case_split",  # CamelCase action split at capitals and joined by "_"
    "wnid_classnames",  # sorted WNID folders, names from classnames.txt
    "numeric_classnames",  # folder number = label, names by position in classnames.txt
)
DOWNLOAD_STATUSES = (
    "listed",  # given by the CoOp documentation, no report either way
    "current",  # named by a source as the current host
    "dead",  # reported to return 404 or to be gone
    "reported_broken",  # reported to fail (certificates, timeouts) but not gone
)
FOLDER_LOADERS = ("imagenet", "numeric_folders", "wnid_folders")  # read names from classnames_file

_REQUIRED_KEYS = (
    "name", "coop_name", "title", "folder", "image_dir", "loader", "splits", "split_file",
    "split_paths_relative_to", "required", "metadata_files", "num_classes", "counts", "label_order",
    "base_novel", "template", "class_names", "downloads", "split_source", "prepare", "sources", "unconfirmed",
)
_OPTIONAL_KEYS = ("split_dirs", "classnames_file", "vocabulary_size", "notes")
_ALWAYS_SOURCED = ("layout", "downloads", "num_classes", "counts", "label_order", "template", "class_names")
_SOURCE_KEYS = _ALWAYS_SOURCED + ("split_source", "base_novel", "prepare")


@dataclass(frozen=True)
class BaseNovel:
    num_base: int  # ceil(num_classes / 2): labels below it are base classes, the rest novel
    last_base: str | None  # class name of label num_base - 1; None where not recorded
    first_novel: str | None  # class name of label num_base; None where not recorded


@dataclass(frozen=True)
class ClassNameRule:
    rule: str  # one of NAME_RULES
    ignored_folders: tuple[str, ...] = ()  # image folders that are not classes (sorted_folders only)
    renames: Mapping[str, str] = field(default_factory=dict)  # folder name -> class name, applied after labelling
    known: Mapping[int, str] = field(default_factory=dict)  # label -> class name facts the check compares with


@dataclass(frozen=True)
class Download:
    description: str  # the file or page offered
    url: str  # where it is (or was) offered
    status: str  # one of DOWNLOAD_STATUSES
    note: str = ""  # what a user should know about this source


@dataclass(frozen=True)
class SplitSource:
    google_drive_id: str  # the split JSON's Google Drive file id, as linked from CoOp's DATASETS.md
    mirrors: tuple[str, ...] = ()  # other places that ship the split JSON

    @property
    def url(self) -> str:
        return f"https://drive.google.com/file/d/{self.google_drive_id}/view"


@dataclass(frozen=True)
class PrepareStep:
    url: str  # official archive or file
    file: str  # name the download is saved under, in the dataset folder
    member: str | None  # folder inside the archive whose contents go to target; None: the download is the file
    target: str  # destination relative to the dataset folder ("." is the dataset folder itself)
    size: int | None = None  # expected size in bytes, where known
    sha256: str | None = None  # expected SHA-256 checksum, where known


@dataclass(frozen=True)
class Manifest:
    """One benchmark's layout, sizes, naming rules and sources, read from ``data_manifests/<name>.yaml``."""

    name: str  # capt's dataset name, e.g. "caltech101"
    coop_name: str  # DATASET.NAME in CoOp-family configs, e.g. "Caltech101"
    title: str  # display name
    folder: str  # sub-folder of the data root
    image_dir: str  # image folder relative to the dataset folder
    loader: str  # one of LOADERS
    splits: tuple[str, ...]  # splits the dataset provides
    split_file: str | None  # CoOp split JSON name, None when the dataset has none
    split_paths_relative_to: str  # "image_dir" or "folder"
    required: tuple[str, ...]  # files and folders the loader reads
    metadata_files: tuple[str, ...]  # optional files the check reads to verify names
    num_classes: int  # classes in the label space
    counts: Mapping[str, int]  # split -> images in the published split
    label_order: str  # how labels are assigned
    base_novel: BaseNovel | None  # None for test-only datasets
    template: str  # prompt with one {} slot
    class_names: ClassNameRule
    downloads: tuple[Download, ...]
    split_source: SplitSource | None  # None when there is no split JSON
    prepare_steps: tuple[PrepareStep, ...]  # downloads capt data prepare may script
    manual_steps: tuple[str, ...]  # preparation steps for a person to follow
    sources: Mapping[str, str]  # fact field -> source
    unconfirmed: Mapping[str, str]  # dotted fact field -> why it is unconfirmed
    path: Path  # the manifest file
    split_dirs: Mapping[str, str] = field(default_factory=dict)  # imagenet: split -> folder under image_dir
    classnames_file: str | None = None  # ImageNet family: WNID -> name file
    vocabulary_size: int | None = None  # ImageNet family: lines in classnames_file
    notes: tuple[str, ...] = ()

    def dataset_dir(self, root: str | os.PathLike) -> Path:
        """Return the dataset folder under the data ``root``."""
        return Path(root).expanduser() / self.folder

    def is_confirmed(self, dotted_field: str) -> bool:
        """Tell whether a fact such as ``"counts.test"`` is confirmed (neither it nor a parent is unconfirmed)."""
        parts = dotted_field.split(".")
        return not any(".".join(parts[:i]) in self.unconfirmed for i in range(1, len(parts) + 1))

    def source_of(self, dotted_field: str) -> str:
        """Return the source of a fact, looked up at the field and then at its parents."""
        parts = dotted_field.split(".")
        for i in range(len(parts), 0, -1):
            key = ".".join(parts[:i])
            if key in self.sources:
                return self.sources[key]
        return self.sources["layout"]


def list_datasets(manifest_dir: str | os.PathLike | None = None) -> list[str]:
    """Return the names of all manifests, sorted."""
    directory = _manifest_dir(manifest_dir)
    return sorted(path.stem for path in directory.glob("*.yaml"))


def load_manifest(name: str, manifest_dir: str | os.PathLike | None = None) -> Manifest:
    """Read and validate the manifest of dataset ``name`` (capt name such as "caltech101" or CoOp name such as "Caltech101").

    Raises ValueError for an unknown name or a manifest that breaks the schema, naming the
    file and the field at fault.
    """
    directory = _manifest_dir(manifest_dir)
    path = directory / f"{name}.yaml"
    if not path.is_file():
        path = _find_by_coop_name(name, directory)

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    return parse_manifest(raw, path)


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """Validate the parsed YAML ``raw`` of the manifest file ``path`` and build the Manifest."""
    reader = _Reader(raw, path)
    reader.check_keys()

    loader = reader.choice("loader", LOADERS)
    splits = tuple(reader.string_list("splits"))
    for split in splits:
        if split not in SPLITS:
            reader.fail("splits", f"contains {split!r}; valid splits are {list(SPLITS)}")
    num_classes = reader.integer("num_classes", minimum=2)

    manifest = Manifest(
        name=reader.string("name"),
        coop_name=reader.string("coop_name"),
        title=reader.string("title"),
        folder=reader.string("folder"),
        image_dir=reader.string("image_dir"),
        loader=loader,
        splits=splits,
        split_file=reader.optional_string("split_file"),
        split_paths_relative_to=reader.choice("split_paths_relative_to", ("image_dir", "folder")),
        required=tuple(reader.string_list("required")),
        metadata_files=tuple(reader.string_list("metadata_files")),
        num_classes=num_classes,
        counts=_read_counts(reader, splits),
        label_order=reader.string("label_order"),
        base_novel=_read_base_novel(reader, num_classes),
        template=_read_template(reader),
        class_names=_read_class_names(reader, num_classes),
        downloads=_read_downloads(reader),
        split_source=_read_split_source(reader),
        prepare_steps=_read_prepare_steps(reader),
        manual_steps=tuple(reader.nested_string_list("prepare", "manual")),
        sources=reader.string_map("sources"),
        unconfirmed=reader.string_map("unconfirmed"),
        path=path,
        split_dirs=reader.string_map("split_dirs") if "split_dirs" in reader.raw else {},
        classnames_file=reader.optional_string("classnames_file"),
        vocabulary_size=reader.raw.get("vocabulary_size"),
        notes=tuple(reader.string_list("notes")) if "notes" in reader.raw else (),
    )
    _check_consistency(manifest, reader)
    return manifest


def _manifest_dir(manifest_dir: str | os.PathLike | None) -> Path:
    directory = Path(manifest_dir) if manifest_dir is not None else MANIFEST_DIR
    if not directory.is_dir():
        # NOTE: the manifests live at the repository root, so a non-editable install has none.
        raise FileNotFoundError(
            f"manifest folder {directory} does not exist; capt reads data_manifests/ from a source checkout "
            "(pip install -e .), or pass manifest_dir"
        )
    return directory


def _find_by_coop_name(name: str, directory: Path) -> Path:
    for path in sorted(directory.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(raw, dict) and raw.get("coop_name") == name:
            return path
    valid = sorted(path.stem for path in directory.glob("*.yaml"))
    raise ValueError(f"unknown dataset {name!r}; valid names are {valid} (or their CoOp DATASET.NAME)")


class _Reader:
    """Typed access to the raw YAML mapping; every error names the file and the field."""

    def __init__(self, raw: Any, path: Path):
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a manifest must be a YAML mapping, found {type(raw).__name__}")
        self.raw = raw
        self.path = path

    def fail(self, key: str, problem: str) -> None:
        raise ValueError(f"{self.path}: field {key!r} {problem}")

    def check_keys(self) -> None:
        missing = [key for key in _REQUIRED_KEYS if key not in self.raw]
        if missing:
            raise ValueError(f"{self.path}: missing fields {missing}")
        unknown = sorted(set(self.raw) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise ValueError(
                f"{self.path}: unknown fields {unknown}; valid fields are {sorted(_REQUIRED_KEYS + _OPTIONAL_KEYS)}"
            )

    def string(self, key: str, mapping: dict | None = None, where: str | None = None) -> str:
        mapping = self.raw if mapping is None else mapping
        value = mapping.get(key)
        if not isinstance(value, str) or not value:
            self.fail(where or key, f"must be a non-empty string, found {value!r}")
        return value

    def optional_string(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            self.fail(key, f"must be a non-empty string or null, found {value!r}")
        return value

    def choice(self, key: str, valid: tuple[str, ...]) -> str:
        value = self.raw.get(key)
        if value not in valid:
            self.fail(key, f"is {value!r}; valid values are {list(valid)}")
        return value

    def integer(self, key: str, minimum: int) -> int:
        value = self.raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(key, f"must be an integer >= {minimum}, found {value!r}")
        return value

    def string_list(self, key: str) -> list[str]:
        value = self.raw.get(key)
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            self.fail(key, f"must be a list of non-empty strings, found {value!r}")
        return value

    def nested_string_list(self, key: str, inner: str) -> list[str]:
        outer = self.raw.get(key)
        value = outer.get(inner) if isinstance(outer, dict) else None
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            self.fail(f"{key}.{inner}", f"must be a list of non-empty strings, found {value!r}")
        return value

    def string_map(self, key: str) -> dict[str, str]:
        value = self.raw.get(key)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
        ):
            self.fail(key, f"must be a mapping of strings to non-empty strings, found {value!r}")
        return dict(value)

    def mapping(self, key: str) -> dict:
        value = self.raw.get(key)
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, found {value!r}")
        return value


def _read_counts(reader: _Reader, splits: tuple[str, ...]) -> dict[str, int]:
    counts = reader.mapping("counts")
    if set(counts) != set(splits):
        reader.fail("counts", f"has splits {sorted(counts)} but the dataset provides {list(splits)}")
    for split, count in counts.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            reader.fail(f"counts.{split}", f"must be a positive integer, found {count!r}")
    return dict(counts)


def _read_base_novel(reader: _Reader, num_classes: int) -> BaseNovel | None:
    raw = reader.raw.get("base_novel")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"num_base", "last_base", "first_novel"}:
        reader.fail("base_novel", f"must be null or a mapping with num_base, last_base and first_novel, found {raw!r}")

    expected = math.ceil(num_classes / 2)
    if raw["num_base"] != expected:
        reader.fail("base_novel.num_base", f"is {raw['num_base']!r} but ceil({num_classes} / 2) = {expected}")
    for key in ("last_base", "first_novel"):
        if raw[key] is not None and (not isinstance(raw[key], str) or not raw[key]):
            reader.fail(f"base_novel.{key}", f"must be a class name or null, found {raw[key]!r}")
    return BaseNovel(num_base=raw["num_base"], last_base=raw["last_base"], first_novel=raw["first_novel"])


def _read_template(reader: _Reader) -> str:
    template = reader.string("template")
    if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
        reader.fail("template", f"is {template!r}; it must contain exactly one '{{}}' slot and no other braces")
    return template


def _read_class_names(reader: _Reader, num_classes: int) -> ClassNameRule:
    raw = reader.mapping("class_names")
    unknown = sorted(set(raw) - {"rule", "ignored_folders", "renames", "known"})
    if unknown:
        reader.fail("class_names", f"has unknown fields {unknown}; valid: rule, ignored_folders, renames, known")
    if raw.get("rule") not in NAME_RULES:
        reader.fail("class_names.rule", f"is {raw.get('rule')!r}; valid rules are {list(NAME_RULES)}")

    ignored = raw.get("ignored_folders", [])
    renames = raw.get("renames", {})
    known = raw.get("known", {})
    if (ignored or renames) and raw["rule"] != "sorted_folders":
        reader.fail("class_names", "may set ignored_folders and renames only with the rule 'sorted_folders'")
    if not isinstance(ignored, list) or not all(isinstance(item, str) for item in ignored):
        reader.fail("class_names.ignored_folders", f"must be a list of folder names, found {ignored!r}")
    if not isinstance(renames, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in renames.items()):
        reader.fail("class_names.renames", f"must map folder names to class names, found {renames!r}")
    if not isinstance(known, dict):
        reader.fail("class_names.known", f"must map labels to class names, found {known!r}")
    for label, name in known.items():
        if not isinstance(label, int) or not 0 <= label < num_classes or not isinstance(name, str):
            reader.fail("class_names.known", f"has the entry {label!r}: {name!r}; labels must lie in [0, {num_classes})")
    return ClassNameRule(rule=raw["rule"], ignored_folders=tuple(ignored), renames=dict(renames), known=dict(known))


def _read_downloads(reader: _Reader) -> tuple[Download, ...]:
    raw = reader.raw.get("downloads")
    if not isinstance(raw, list) or not raw:
        reader.fail("downloads", f"must be a non-empty list, found {raw!r}")

    downloads = []
    for i, entry in enumerate(raw):
        where = f"downloads[{i}]"
        fields = {"description", "url", "status"}
        if not isinstance(entry, dict) or not fields <= set(entry) or set(entry) - fields - {"note"}:
            reader.fail(where, f"must be a mapping with description, url, status and an optional note, found {entry!r}")
        if entry["status"] not in DOWNLOAD_STATUSES:
            reader.fail(f"{where}.status", f"is {entry['status']!r}; valid values are {list(DOWNLOAD_STATUSES)}")
        downloads.append(Download(
            description=reader.string("description", entry, f"{where}.description"),
            url=reader.string("url", entry, f"{where}.url"),
            status=entry["status"],
            note=entry.get("note", ""),
        ))
    return tuple(downloads)


def _read_split_source(reader: _Reader) -> SplitSource | None:
    raw = reader.raw.get("split_source")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"google_drive_id", "mirrors"}:
        reader.fail("split_source", f"must be null or a mapping with google_drive_id and mirrors, found {raw!r}")
    mirrors = raw.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(item, str) for item in mirrors):
        reader.fail("split_source.mirrors", f"must be a list of URLs, found {mirrors!r}")
    return SplitSource(
        google_drive_id=reader.string("google_drive_id", raw, "split_source.google_drive_id"),
        mirrors=tuple(mirrors),
    )


def _read_prepare_steps(reader: _Reader) -> tuple[PrepareStep, ...]:
    prepare = reader.mapping("prepare")
    if set(prepare) != {"steps", "manual"}:
        reader.fail("prepare", f"must have exactly the fields steps and manual, found {sorted(prepare)}")
    if not isinstance(prepare["steps"], list):
        reader.fail("prepare.steps", f"must be a list, found {prepare['steps']!r}")

    steps = []
    valid = {"url", "file", "member", "target", "size", "sha256"}
    for i, entry in enumerate(prepare["steps"]):
        where = f"prepare.steps[{i}]"
        if not isinstance(entry, dict) or not {"url", "file", "member", "target"} <= set(entry) or set(entry) - valid:
            reader.fail(where, f"must be a mapping with url, file, member, target and optional size and sha256, found {entry!r}")
        member = entry["member"]
        if member is not None and (not isinstance(member, str) or not member):
            reader.fail(f"{where}.member", f"must be a folder inside the archive or null, found {member!r}")
        size = entry.get("size")
        if size is not None and (not isinstance(size, int) or size < 1):
            reader.fail(f"{where}.size", f"must be a positive byte count or null, found {size!r}")
        steps.append(PrepareStep(
            url=reader.string("url", entry, f"{where}.url"),
            file=reader.string("file", entry, f"{where}.file"),
            member=member,
            target=reader.string("target", entry, f"{where}.target"),
            size=size,
            sha256=entry.get("sha256"),
        ))
    return tuple(steps)


def _check_consistency(manifest: Manifest, reader: _Reader) -> None:
    """Cross-field rules: the file name, the loader's needs and a source for every fact."""
    if manifest.name != manifest.path.stem:
        reader.fail("name", f"is {manifest.name!r} but the file is named {manifest.path.name}; they must agree")

    if manifest.loader == "split_json" and (manifest.split_file is None or manifest.split_source is None):
        reader.fail("split_file", "and split_source must be set for the loader 'split_json'")
    if manifest.loader != "split_json" and manifest.split_file is not None:
        reader.fail("split_file", f"must be null for the loader {manifest.loader!r}, which reads no split JSON")
    if manifest.loader in FOLDER_LOADERS:
        if manifest.classnames_file is None or not isinstance(manifest.vocabulary_size, int):
            reader.fail("classnames_file", f"and vocabulary_size must be set for the loader {manifest.loader!r}")
    if manifest.loader == "imagenet" and set(manifest.split_dirs) != set(manifest.splits):
        reader.fail("split_dirs", f"must name a folder for each split {list(manifest.splits)}")
    if manifest.base_novel is None and "train" in manifest.splits:
        reader.fail("base_novel", "must be set for a dataset with a train split")

    needed = list(_ALWAYS_SOURCED)
    needed += ["split_source"] if manifest.split_source is not None else []
    needed += ["base_novel"] if manifest.base_novel is not None else []
    needed += ["prepare"] if manifest.prepare_steps else []
    missing = [key for key in needed if key not in manifest.sources]
    if missing:
        reader.fail("sources", f"has no entry for {missing}; every fact needs a source")
    unknown = sorted(set(manifest.sources) - set(_SOURCE_KEYS))
    if unknown:
        reader.fail("sources", f"has unknown keys {unknown}; valid keys are {list(_SOURCE_KEYS)}")
    for dotted in manifest.unconfirmed:
        if dotted.split(".")[0] not in set(_SOURCE_KEYS) | set(_REQUIRED_KEYS):
            reader.fail("unconfirmed", f"names {dotted!r}, which is not a field of the manifest")
