"""The confusion bank: what the base model got wrong on the few-shot training split.

For each training image the bank stores the true label, the pseudo label (the base
model's top-1 class), the probability vector, the L2-normalised image feature and,
when the adapter needs them, the ViT tokens. The count matrix ``counts[t, p]`` counts
the images of true class t that the base model predicted as class p. Its diagonal is
zero, so the matrix counts mistakes only. The semantic confusion miner reads the
counts, and the sample confusion miner retrieves confused images pair by pair.

A bank is a pure function of (backbone, base-model weights, split, seed), so it is
built once and cached. On disk it is one folder with two files: ``bank.safetensors``
(the tensors) and ``bank.json`` (class names, provenance, format version and the
SHA-256 of the tensor file). Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from capt_lib.utils.cache import content_key, file_sha256, resolve_cache_dir
from capt_lib.utils.io import atomic_write, atomic_write_json, read_json

logger = logging.getLogger(__name__)

BANK_FORMAT = "capt.confusion_bank"
BANK_FORMAT_VERSION = 1
TENSORS_FILE = "bank.safetensors"
METADATA_FILE = "bank.json"
KEY_INPUTS_FILE = "key_inputs.json"  # written by load_or_build_bank, for people browsing the cache
BANK_CACHE_KIND = "banks"  # cache sub-folder: <cache_dir>/banks/<key>/

# A float32 softmax over 1000 classes sums to 1 within about 1e-6, and fp16 scores
# upcast to float32 within about 1e-3. A larger error means the rows are not probabilities.
PROB_SUM_ATOL = 1e-3
# Allowed distance of each feature's L2 norm from 1.
FEATURE_NORM_ATOL = 1e-3

_REQUIRED_TENSORS = ("true_labels", "pseudo_labels", "probs", "features", "sample_ids", "counts")
_OPTIONAL_TENSORS = ("patch_tokens",)


@dataclass(frozen=True, eq=False)
class ConfusionBank:
    """The base model's predictions on every training image, plus the confusion counts.

    Build one with ``build_confusion_bank`` (from logits) or ``from_predictions`` (from
    probabilities). Those copy their inputs, so the bank owns its tensors. All tensors
    live on the CPU; move the rows you use to the model's device.
    The constructor validates every field and raises ``ValueError`` naming the field.
    """

    classnames: tuple[str, ...]  # classnames[label] names that label; base classes only in base-to-novel runs
    true_labels: torch.Tensor  # (N,) int64 ground-truth labels
    pseudo_labels: torch.Tensor  # (N,) int64 base model's top-1 class, argmax of probs
    probs: torch.Tensor  # (N, C) float32 base model's softmax probabilities
    features: torch.Tensor  # (N, E) float32 L2-normalised image features
    sample_ids: torch.Tensor  # (N,) int64 unique positions of the images in the source split
    counts: torch.Tensor  # (C, C) int64, counts[t, p] = images of class t predicted as p; zero diagonal
    patch_tokens: torch.Tensor | None = None  # (N, T, D) float32 tokens from Backbone.visual_tokens, or None
    meta: dict = field(default_factory=dict)  # provenance (backbone, base model, data, seed), kept in JSON form

    def __post_init__(self):
        object.__setattr__(self, "classnames", tuple(self.classnames))
        _validate_classnames(self.classnames)
        num_images = _validate_rows(self)
        _validate_probs(self.probs, self.pseudo_labels)
        _validate_features(self.features)
        if self.patch_tokens is not None:
            _check_tensor("patch_tokens", self.patch_tokens, torch.float32, ndim=3, num_rows=num_images)
        _validate_counts(self)
        object.__setattr__(self, "meta", _canonical_meta(self.meta))

    @classmethod
    def from_predictions(
        cls,
        true_labels: torch.Tensor | np.ndarray,
        probs: torch.Tensor | np.ndarray,
        features: torch.Tensor | np.ndarray,
        sample_ids: torch.Tensor | np.ndarray,
        classnames: tuple[str, ...] | list[str],
        patch_tokens: torch.Tensor | np.ndarray | None = None,
        meta: dict | None = None,
    ) -> "ConfusionBank":
        """Build a bank from probabilities; pseudo labels and counts are derived here.

        ``features`` must already be L2-normalised (within ``FEATURE_NORM_ATOL``): a bank
        of unnormalised features would give wrong cosine similarities in retrieval, so
        this raises instead of normalising. ``build_confusion_bank`` normalises for you.
        Ties in the argmax go to the lowest class index.
        """
        true_labels = _as_cpu_tensor(true_labels, "true_labels", integer=True)
        probs = _as_cpu_tensor(probs, "probs", integer=False)
        features = _as_cpu_tensor(features, "features", integer=False)
        sample_ids = _as_cpu_tensor(sample_ids, "sample_ids", integer=True)
        if patch_tokens is not None:
            patch_tokens = _as_cpu_tensor(patch_tokens, "patch_tokens", integer=False)
        if probs.ndim != 2:
            raise ValueError(f"ConfusionBank: probs must have shape (N, C), got {tuple(probs.shape)}")
        if probs.shape[1] != len(classnames):
            raise ValueError(
                f"ConfusionBank: probs has {probs.shape[1]} columns but there are {len(classnames)} class names"
            )
        if true_labels.ndim != 1 or true_labels.shape[0] != probs.shape[0]:
            raise ValueError(
                f"ConfusionBank: true_labels must have shape ({probs.shape[0]},) to match probs, "
                f"got {tuple(true_labels.shape)}"
            )

        pseudo_labels = probs.argmax(dim=1)  # (N,)
        _check_label_range("true_labels", true_labels, len(classnames))
        counts = count_confusions(true_labels, pseudo_labels, len(classnames))  # (C, C)

        return cls(
            classnames=tuple(classnames),
            true_labels=true_labels,
            pseudo_labels=pseudo_labels,
            probs=probs,
            features=features,
            sample_ids=sample_ids,
            counts=counts,
            patch_tokens=patch_tokens,
            meta=meta if meta is not None else {},
        )

    def __len__(self) -> int:
        return self.true_labels.numel()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def confused_mask(self) -> torch.Tensor:
        """(N,) bool mask of the images whose pseudo label differs from the true label."""
        return self.true_labels != self.pseudo_labels

    def class_counts(self) -> torch.Tensor:
        """Return the (C,) int64 number of bank images of each true class."""
        return torch.bincount(self.true_labels, minlength=self.num_classes)

    def confusion_rate(self) -> torch.Tensor:
        """Return the (C,) float32 share of each class's images that the base model got wrong.

        A class without images in the bank has no measured rate and gets NaN.
        """
        per_class = self.class_counts().to(torch.float32)
        wrong = self.counts.sum(dim=1).to(torch.float32)
        return torch.where(per_class > 0, wrong / per_class.clamp(min=1), torch.full_like(per_class, float("nan")))

    def pair_rows(self, a: int, b: int) -> torch.Tensor:
        """Return the ascending (M,) int64 row positions of images of true class ``a`` predicted as ``b``."""
        self._check_pair(a, b)
        mask = (self.true_labels == a) & (self.pseudo_labels == b)
        return torch.nonzero(mask).flatten()

    def pair_sample_ids(self, a: int, b: int) -> torch.Tensor:
        """Return the (M,) source-split positions of images of true class ``a`` predicted as ``b``."""
        return self.sample_ids[self.pair_rows(a, b)]

    def top_pairs(self, k: int | None = None, symmetric: bool = False) -> list[tuple[int, int, int]]:
        """Return up to ``k`` confusion pairs as (a, b, count); see ``rank_confusion_pairs``."""
        return rank_confusion_pairs(self.counts, k, symmetric=symmetric)

    def save(self, path_dir: str | os.PathLike) -> Path:
        """Write ``bank.safetensors`` and then ``bank.json`` into ``path_dir``; return the folder.

        Each file is written atomically. ``bank.json`` goes last and records the tensor
        file's SHA-256, so a folder with ``bank.json`` contains a complete bank, and a tensor
        file replaced afterwards is detected on load.
        """
        # NOTE: float32 patch tokens of an ImageNet-size bank (16,000 x 197 x 768) take about 10 GB,
        # and both save and load read the whole file once more to hash it.
        path_dir = Path(path_dir)
        tensors = {name: getattr(self, name).contiguous() for name in _REQUIRED_TENSORS}
        if self.patch_tokens is not None:
            tensors["patch_tokens"] = self.patch_tokens.contiguous()

        digest = {}

        def write_tensors(tmp_path: Path) -> None:
            save_file(tensors, tmp_path)
            digest["sha256"] = file_sha256(tmp_path)

        atomic_write(path_dir / TENSORS_FILE, write_tensors)
        header = {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "classnames": list(self.classnames),
            "num_images": len(self),
            "has_patch_tokens": self.patch_tokens is not None,
            "tensors_sha256": digest["sha256"],
            "meta": self.meta,
        }
        atomic_write_json(path_dir / METADATA_FILE, header)
        logger.info("Saved confusion bank (%d images, %d classes) to %s", len(self), self.num_classes, path_dir)
        return path_dir

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> "ConfusionBank":
        """Read a bank written by ``save``.

        Raises ``FileNotFoundError`` when a file is missing, ``RuntimeError`` when a file
        cannot be read or the tensor file does not match its recorded checksum, and
        ``ValueError`` when the format version or the stored values are invalid. Every
        message names the file at fault.
        """
        path_dir = Path(path_dir)
        header = _read_header(path_dir / METADATA_FILE)
        tensor_path = path_dir / TENSORS_FILE
        tensors = _read_tensors(tensor_path, header["tensors_sha256"])

        try:
            bank = cls(classnames=tuple(header["classnames"]), meta=header["meta"], **tensors)
        except ValueError as e:
            raise ValueError(f"{tensor_path} contains an invalid confusion bank: {e}") from e
        logger.info("Loaded confusion bank (%d images, %d classes) from %s", len(bank), bank.num_classes, path_dir)
        return bank

    def _check_pair(self, a: int, b: int) -> None:
        for name, label in (("a", a), ("b", b)):
            if not 0 <= int(label) < self.num_classes:
                raise ValueError(f"ConfusionBank: class {name}={label} is out of range [0, {self.num_classes})")
        if int(a) == int(b):
            raise ValueError(
                f"ConfusionBank: a confusion pair needs two different classes, got a = b = {a}; "
                "correctly classified images are the rows where confused_mask is False"
            )


def count_confusions(true_labels: torch.Tensor, pseudo_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return the (C, C) int64 matrix ``counts[t, p]`` of images of class t predicted as p, diagonal zeroed."""
    flat = true_labels.to(torch.int64) * num_classes + pseudo_labels.to(torch.int64)  # (N,)
    counts = torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    counts.fill_diagonal_(0)
    return counts


def rank_confusion_pairs(
    counts: torch.Tensor | np.ndarray, k: int | None = None, *, symmetric: bool = False
) -> list[tuple[int, int, Any]]:
    """Return the off-diagonal cells of a (C, C) count matrix as (a, b, count), largest first.

    Ordered pairs (a, b) read "true a, predicted b". With ``symmetric=True`` each
    unordered pair appears once as (a, b) with a < b and count ``counts[a, b] +
    counts[b, a]``. Ties are broken by (a, b) ascending. The diagonal is ignored, and
    pairs with count 0 are left out, so fewer than ``k`` pairs may come back. ``k=None``
    returns every non-zero pair. Counts come back as Python ints for integer matrices
    and as floats otherwise.
    """
    matrix = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"counts must be a square (C, C) matrix, got shape {matrix.shape}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0):
        raise ValueError(f"k={k!r} is invalid; pass a non-negative int, or None for every pair")
    is_integer = np.issubdtype(matrix.dtype, np.integer) or matrix.dtype == np.bool_
    matrix = matrix.astype(np.int64 if is_integer else np.float64)

    num_classes = matrix.shape[0]
    if symmetric:
        matrix = matrix + matrix.T
        rows, cols = np.triu_indices(num_classes, k=1)
    else:
        rows, cols = np.nonzero(~np.eye(num_classes, dtype=bool))
    values = matrix[rows, cols]

    keep = values > 0  # also drops NaN cells of float matrices
    rows, cols, values = rows[keep], cols[keep], values[keep]
    order = np.lexsort((cols, rows, -values))  # the last key sorts first: count descending, then a, then b
    if k is not None:
        order = order[:k]

    cast = int if is_integer else float
    return [(int(rows[i]), int(cols[i]), cast(values[i])) for i in order]


def build_confusion_bank(
    logits: torch.Tensor | np.ndarray,
    true_labels: torch.Tensor | np.ndarray,
    features: torch.Tensor | np.ndarray,
    sample_ids: torch.Tensor | np.ndarray,
    classnames: tuple[str, ...] | list[str],
    *,
    patch_tokens: torch.Tensor | np.ndarray | None = None,
    meta: dict | None = None,
) -> ConfusionBank:
    """Build a bank from the base model's raw outputs on the training images.

    ``logits`` (N, C) are the scores as the base model outputs them, with CLIP's logit
    scale applied, because the softmax temperature comes from that scale. They are
    upcast to float32 before the softmax. ``features`` (N, E) are the image embeddings
    (``Backbone.visual_head`` output, for instance) and are L2-normalised here.
    """
    logits = _as_cpu_tensor(logits, "logits", integer=False)
    if logits.ndim != 2:
        raise ValueError(f"build_confusion_bank: logits must have shape (N, C), got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("build_confusion_bank: logits contain NaN or infinite values")
    probs = logits.softmax(dim=1)  # (N, C)

    features = _as_cpu_tensor(features, "features", integer=False)
    if features.ndim != 2:
        raise ValueError(f"build_confusion_bank: features must have shape (N, E), got {tuple(features.shape)}")
    norms = features.norm(dim=1, keepdim=True)  # (N, 1)
    if not (torch.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError("build_confusion_bank: features contain a zero, NaN or infinite row that cannot be normalised")
    features = features / norms  # (N, E)

    return ConfusionBank.from_predictions(
        true_labels, probs, features, sample_ids, classnames, patch_tokens=patch_tokens, meta=meta
    )


def load_or_build_bank(
    key_inputs: Mapping[str, Any],
    build_fn: Callable[[], ConfusionBank],
    cache_dir: str | os.PathLike | None = None,
) -> ConfusionBank:
    """Load the bank cached under ``key_inputs``, or build it with ``build_fn`` and cache it.

    The folder is ``resolve_cache_dir(cache_dir)/banks/<content_key(key_inputs)>/``. A
    bank depends on the backbone, the base-model weights, the training split and the
    seed, so ``key_inputs`` must contain all of them: an input left out makes two
    different banks share one cache entry. A corrupt entry raises instead of being
    rebuilt silently; delete its folder to rebuild it.
    """
    if not isinstance(key_inputs, Mapping) or not key_inputs:
        raise ValueError(
            "load_or_build_bank: key_inputs must be a non-empty dict naming the backbone, base-model "
            f"weights, split and seed, got {key_inputs!r}"
        )
    key = content_key(dict(key_inputs))
    bank_dir = resolve_cache_dir(cache_dir) / BANK_CACHE_KIND / key

    if (bank_dir / METADATA_FILE).exists():
        logger.info("Using cached confusion bank %s from %s", key, bank_dir)
        return ConfusionBank.load(bank_dir)

    logger.info("Building confusion bank %s, because %s has no cached copy", key, bank_dir)
    bank = build_fn()
    if not isinstance(bank, ConfusionBank):
        raise TypeError(f"load_or_build_bank: build_fn must return a ConfusionBank, got {type(bank).__name__}")
    atomic_write_json(bank_dir / KEY_INPUTS_FILE, dict(key_inputs))
    bank.save(bank_dir)
    return bank


def _as_cpu_tensor(value: Any, name: str, *, integer: bool) -> torch.Tensor:
    """Copy ``value`` into a CPU tensor: int64 for labels and ids, float32 for scores and features."""
    if isinstance(value, torch.Tensor):
        tensor, owned = value.detach(), False
    else:
        tensor, owned = torch.from_numpy(np.array(value)), True  # np.array copies, so the memory is ours

    if integer and (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool):
        raise ValueError(f"ConfusionBank: {name} must contain integers, got dtype {tensor.dtype}")
    dtype = torch.int64 if integer else torch.float32
    return tensor.to(device="cpu", dtype=dtype, copy=not owned)


def _check_tensor(name: str, tensor: Any, dtype: torch.dtype, *, ndim: int, num_rows: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"ConfusionBank: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise ValueError(f"ConfusionBank: {name} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.ndim != ndim:
        raise ValueError(f"ConfusionBank: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.device.type != "cpu":
        raise ValueError(f"ConfusionBank: {name} must be on the CPU, got {tensor.device}")
    if num_rows is not None and tensor.shape[0] != num_rows:
        raise ValueError(f"ConfusionBank: {name} has {tensor.shape[0]} rows but true_labels has {num_rows}")
    if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
        raise ValueError(f"ConfusionBank: {name} contains NaN or infinite values")


def _check_label_range(name: str, labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"ConfusionBank: {name} must lie in [0, {num_classes}), "
            f"found [{int(labels.min())}, {int(labels.max())}]"
        )


def _validate_classnames(classnames: tuple) -> None:
    if not classnames or not all(isinstance(name, str) for name in classnames):
        raise ValueError(f"ConfusionBank: classnames must be a non-empty sequence of str, got {classnames!r}")
    duplicates = sorted({name for name in classnames if classnames.count(name) > 1})
    if duplicates:
        raise ValueError(f"ConfusionBank: classnames contain duplicates: {duplicates}")


def _validate_rows(bank: ConfusionBank) -> int:
    """Check the per-image tensors against each other and return the number of images."""
    _check_tensor("true_labels", bank.true_labels, torch.int64, ndim=1)
    num_images = bank.true_labels.shape[0]
    if num_images == 0:
        raise ValueError("ConfusionBank: a bank needs at least one image, got 0")
    _check_tensor("pseudo_labels", bank.pseudo_labels, torch.int64, ndim=1, num_rows=num_images)
    _check_tensor("probs", bank.probs, torch.float32, ndim=2, num_rows=num_images)
    _check_tensor("features", bank.features, torch.float32, ndim=2, num_rows=num_images)
    _check_tensor("sample_ids", bank.sample_ids, torch.int64, ndim=1, num_rows=num_images)

    num_classes = len(bank.classnames)
    if bank.probs.shape[1] != num_classes:
        raise ValueError(f"ConfusionBank: probs has {bank.probs.shape[1]} columns but there are {num_classes} classes")
    _check_label_range("true_labels", bank.true_labels, num_classes)
    _check_label_range("pseudo_labels", bank.pseudo_labels, num_classes)
    if bank.sample_ids.min() < 0:
        raise ValueError(f"ConfusionBank: sample_ids must be non-negative, found {int(bank.sample_ids.min())}")
    if torch.unique(bank.sample_ids).numel() != num_images:
        raise ValueError("ConfusionBank: sample_ids contain duplicates; each row must name a different image")
    return num_images


def _validate_probs(probs: torch.Tensor, pseudo_labels: torch.Tensor) -> None:
    if (probs < 0).any():
        raise ValueError("ConfusionBank: probs contain negative values; pass softmax probabilities, not logits")
    row_error = (probs.sum(dim=1) - 1).abs().max().item()
    if row_error > PROB_SUM_ATOL:
        raise ValueError(
            f"ConfusionBank: probs rows must sum to 1 (within {PROB_SUM_ATOL}), but one is off by {row_error:.3g}; "
            "pass softmax probabilities, or use build_confusion_bank for logits"
        )
    if not torch.equal(probs.argmax(dim=1), pseudo_labels):
        raise ValueError("ConfusionBank: pseudo_labels must equal probs.argmax(dim=1)")


def _validate_features(features: torch.Tensor) -> None:
    norm_error = (features.norm(dim=1) - 1).abs().max().item()
    if norm_error > FEATURE_NORM_ATOL:
        raise ValueError(
            f"ConfusionBank: features must be L2-normalised (within {FEATURE_NORM_ATOL}), but a row norm is off "
            f"by {norm_error:.3g}; normalise them, or use build_confusion_bank, which does"
        )


def _validate_counts(bank: ConfusionBank) -> None:
    num_classes = len(bank.classnames)
    _check_tensor("counts", bank.counts, torch.int64, ndim=2)
    if tuple(bank.counts.shape) != (num_classes, num_classes):
        raise ValueError(
            f"ConfusionBank: counts must have shape ({num_classes}, {num_classes}), got {tuple(bank.counts.shape)}"
        )
    expected = count_confusions(bank.true_labels, bank.pseudo_labels, num_classes)
    if not torch.equal(bank.counts, expected):
        raise ValueError("ConfusionBank: counts do not match true_labels and pseudo_labels")


def _canonical_meta(meta: Any) -> dict:
    """Return ``meta`` after a JSON round trip, so that a loaded bank's meta equals the saved one.

    The round trip turns tuples into lists and non-string keys into strings.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"ConfusionBank: meta must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"ConfusionBank: meta must be JSON-serialisable, so that it survives save and load: {e}"
        ) from e


def _read_header(json_path: Path) -> dict:
    if not json_path.exists():
        raise FileNotFoundError(f"no confusion bank at {json_path.parent}: {json_path.name} is missing")
    try:
        header = read_json(json_path)
    except (ValueError, OSError) as e:
        raise RuntimeError(f"failed to read confusion bank metadata {json_path}: {e}") from e

    if not isinstance(header, dict) or header.get("format") != BANK_FORMAT:
        raise ValueError(f"{json_path} is not a confusion bank file: expected format {BANK_FORMAT!r}")
    if header.get("format_version") != BANK_FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has confusion bank format version {header.get('format_version')!r}, but this code "
            f"reads version {BANK_FORMAT_VERSION}; delete the folder to rebuild the bank"
        )
    missing = [key for key in ("classnames", "meta", "tensors_sha256") if key not in header]
    if missing:
        raise ValueError(f"{json_path} is missing the keys {missing}")
    return header


def _read_tensors(tensor_path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    if not tensor_path.exists():
        raise FileNotFoundError(f"confusion bank tensor file {tensor_path} is missing")
    actual_sha256 = file_sha256(tensor_path)
    if actual_sha256 != expected_sha256:
        raise RuntimeError(
            f"{tensor_path} does not match the SHA-256 recorded in {METADATA_FILE} (file {actual_sha256[:16]}, "
            f"recorded {str(expected_sha256)[:16]}): it is corrupt or was overwritten. "
            "Delete the folder to rebuild the bank"
        )
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as e:
        raise RuntimeError(f"failed to read confusion bank tensors {tensor_path}: {e}") from e

    missing = [name for name in _REQUIRED_TENSORS if name not in tensors]
    unknown = sorted(set(tensors) - set(_REQUIRED_TENSORS) - set(_OPTIONAL_TENSORS))
    if missing or unknown:
        raise ValueError(
            f"{tensor_path} has missing tensors {missing} and unknown tensors {unknown}; "
            f"expected {list(_REQUIRED_TENSORS)} and optionally {list(_OPTIONAL_TENSORS)}"
        )
    return tensors
