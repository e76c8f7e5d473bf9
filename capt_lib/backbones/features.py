"""Image features of the frozen backbone, computed once per (backbone, dataset) and cached on disk.

``encode_dataset`` runs every image through ``backbone.preprocess`` and the frozen image
tower, and returns L2-normalised image features and, on request, the tokens after the
last ViT block (what the Diff-Manner Adapter reads). Results are stored as safetensors
under ``<cache root>/features/<key>``, where the key hashes everything the numbers depend
on: the backbone's weights key, the dataset's content, the autocast precision, the
augmentation and the number of views. A later call with the same inputs reads the file
instead of running the model.

Augmented views: ``augment="flip"`` or ``"crop_flip"`` with ``views=V`` stores ``V``
augmented copies of every image, with shapes (V, N, ...). The random draw for an image
depends only on its view number and its source index, so the same image gets the same
views in every subset and every run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from capt_lib.backbones.base import Backbone
from capt_lib.data.dataset import ClassificationDataset
from capt_lib.utils.cache import content_key, resolve_cache_dir
from capt_lib.utils.device import autocast, resolve_device, resolve_precision
from capt_lib.utils.io import atomic_write, atomic_write_json, read_json

logger = logging.getLogger(__name__)

FEATURE_FORMAT = "capt-features/1"  # part of every key, to be changed whenever the stored values change meaning
TENSORS_FILE = "features.safetensors"
META_FILE = "meta.json"  # written after the tensors, so its presence marks a complete entry


@dataclass(eq=False)
class FeatureSet:
    """Frozen-backbone outputs for a dataset, row-aligned with its labels and source indices.

    Without augmentation the shapes are the ones listed below. With an augmentation
    every image tensor gains a leading view axis: features (V, N, embed_dim) and tokens
    (V, N, 1 + HW, width).
    """

    features: torch.Tensor  # (N, embed_dim) float32, L2-normalised
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) int64 positions in the source split
    tokens: torch.Tensor | None = None  # (N, 1 + HW, width) float32 tokens after the last ViT block
    meta: dict = field(default_factory=dict)  # provenance: backbone, dataset fingerprint, settings, cache key

    def __len__(self) -> int:
        return len(self.labels)


def flip(image: Image.Image, generator: torch.Generator) -> Image.Image:
    """Mirror the image left to right with probability 0.5."""
    if torch.rand((), generator=generator).item() < 0.5:
        return ImageOps.mirror(image)
    return image


def crop_flip(image: Image.Image, generator: torch.Generator) -> Image.Image:
    """Crop a random box (50-100 % of the area, aspect ratio 3/4-4/3), resize it back, then ``flip``.

    This is the usual random-resized-crop-and-flip training augmentation, with the
    minimum area fixed at 50 % so that a cached view still shows most of the object.
    """
    width, height = image.size
    area = width * height * (0.5 + 0.5 * torch.rand((), generator=generator).item())
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=generator).item()
    ratio = math.exp(log_ratio)
    crop_width = min(width, max(1, round(math.sqrt(area * ratio))))
    crop_height = min(height, max(1, round(math.sqrt(area / ratio))))

    left = int(torch.randint(0, width - crop_width + 1, (), generator=generator))
    top = int(torch.randint(0, height - crop_height + 1, (), generator=generator))
    box = (left, top, left + crop_width, top + crop_height)
    cropped = image.resize((width, height), Image.Resampling.BICUBIC, box=box)
    return flip(cropped, generator)


AUGMENTATIONS: dict[str, Callable[[Image.Image, torch.Generator], Image.Image]] = {
    "flip": flip,
    "crop_flip": crop_flip,
}


def encode_dataset(
    backbone: Backbone,
    dataset: ClassificationDataset,
    *,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    with_tokens: bool = False,
    device: str | torch.device | None = None,
    precision: str | None = None,
    views: int = 1,
    augment: str | None = None,
) -> FeatureSet:
    """Encode every image of ``dataset`` with the frozen backbone, reading or filling the cache.

    ``cache_dir`` is the cache root (see ``resolve_cache_dir``). ``device`` None keeps
    the backbone where it is, and another device moves ``backbone.model`` there.
    ``precision`` None uses the backbone's own setting (fp32 when it has none).
    ``augment`` names an entry of ``AUGMENTATIONS`` and then ``views`` augmented copies
    are encoded. Without ``augment``, ``views`` must be 1. An entry stored with tokens
    also serves a request without tokens.
    """
    _check_arguments(backbone, dataset, batch_size, with_tokens, views, augment)
    device = _place_backbone(backbone, device)
    precision = resolve_precision(precision or backbone.info.get("precision", "fp32"), device)

    settings = {"views": views, "augment": augment, "precision": precision}
    key_inputs = _key_inputs(backbone, dataset, settings)
    request_key = content_key({**key_inputs, "with_tokens": with_tokens})
    candidates = [request_key] if with_tokens else [request_key, content_key({**key_inputs, "with_tokens": True})]
    root = resolve_cache_dir(cache_dir) / "features"
    for key in candidates:
        cached = _read_entry(root / key, with_tokens)
        if cached is not None:
            logger.info("reusing cached features %s for %s/%s", root / key, dataset.name, dataset.split)
            return cached

    features, tokens = _encode(backbone, dataset, batch_size, with_tokens, device, precision, views, augment)
    meta = _describe(backbone, dataset, settings, with_tokens, request_key, features)
    result = FeatureSet(
        features=features,
        labels=torch.tensor(dataset.labels, dtype=torch.int64),
        indices=torch.tensor(dataset.indices, dtype=torch.int64),
        tokens=tokens,
        meta=meta,
    )
    _write_entry(root / request_key, result)
    return result


def _check_arguments(backbone, dataset, batch_size, with_tokens, views, augment) -> None:
    if len(dataset) == 0:
        raise ValueError(f"{dataset.name}/{dataset.split} is empty, so there is nothing to encode")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid. It must be at least 1.")
    if views < 1:
        raise ValueError(f"views={views} is invalid. It must be at least 1.")
    if augment is None and views != 1:
        raise ValueError(f"views={views} needs an augmentation. Set augment to one of {sorted(AUGMENTATIONS)}.")
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r} is not a known augmentation. Choose one of {sorted(AUGMENTATIONS)}.")
    if with_tokens and not isinstance(backbone.model.visual, VisionTransformer):
        raise ValueError(
            f"with_tokens=True needs an open_clip VisionTransformer image tower, but {backbone.name} has "
            f"{type(backbone.model.visual).__name__}"
        )


def _place_backbone(backbone: Backbone, device) -> torch.device:
    if device is None:
        return backbone.device
    device = resolve_device(device)
    if device != backbone.device:
        logger.info("moving backbone %s from %s to %s", backbone.name, backbone.device, device)
        backbone.model.to(device)
    return device


def _key_inputs(backbone: Backbone, dataset: ClassificationDataset, settings: dict) -> dict:
    """Collect everything the stored numbers depend on, apart from ``with_tokens``."""
    return {
        "format": FEATURE_FORMAT,
        "backbone": backbone.key,
        "dataset": dataset.fingerprint(),
        "images_sha256": _images_sha256(dataset),
        **settings,
    }


def _images_sha256(dataset: ClassificationDataset) -> str | None:
    """Hash in-memory pixels, which ``fingerprint()`` leaves out (file datasets are keyed by path)."""
    if dataset.images is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(dataset.images).tobytes()).hexdigest()


def _encode(backbone, dataset, batch_size, with_tokens, device, precision, views, augment):
    """Run the image tower over every view and batch: features (N, E) or (V, N, E), tokens likewise."""
    view_ids = list(range(views)) if augment is not None else [None]
    num_batches = math.ceil(len(dataset) / batch_size)
    use_tokens = isinstance(backbone.model.visual, VisionTransformer)

    feature_views, token_views = [], []
    with tqdm(total=len(view_ids) * num_batches, desc=f"encoding {dataset.name}/{dataset.split}", unit="batch") as bar:
        for view in view_ids:
            feature_batches, token_batches = [], []
            for start in range(0, len(dataset), batch_size):
                positions = range(start, min(start + batch_size, len(dataset)))
                images = torch.stack([backbone.preprocess(_view_image(dataset, i, view, augment)) for i in positions])
                images = images.to(device)  # (B, 3, image_size, image_size)

                with torch.no_grad(), autocast(device, precision):
                    if use_tokens:
                        tokens = backbone.visual_tokens(images)  # (B, 1 + HW, width)
                        pooled = backbone.visual_head(tokens)  # (B, embed_dim)
                    else:
                        tokens, pooled = None, backbone.model.encode_image(images)  # (B, embed_dim)

                feature_batches.append(F.normalize(pooled.float(), dim=-1).cpu())
                if with_tokens:
                    token_batches.append(tokens.float().cpu())
                bar.update()

            feature_views.append(torch.cat(feature_batches))  # (N, embed_dim)
            if with_tokens:
                token_views.append(torch.cat(token_batches))  # (N, 1 + HW, width)

    if augment is None:
        return feature_views[0], token_views[0] if with_tokens else None
    return torch.stack(feature_views), torch.stack(token_views) if with_tokens else None  # (V, N, ...)


def _view_image(dataset: ClassificationDataset, position: int, view: int | None, augment: str | None) -> Image.Image:
    image = dataset.load_image(position)
    if augment is None:
        return image

    # Seeding by (view, source index) gives an image the same views in every subset, batch size and run.
    # SeedSequence mixes both into 32 bits, the part of a seed that torch's CPU generator uses.
    seed = np.random.SeedSequence([view, int(dataset.indices[position])]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    return AUGMENTATIONS[augment](image, generator)


def _describe(backbone, dataset, settings, with_tokens, key, features) -> dict:
    return {
        "format": FEATURE_FORMAT,
        "key": key,
        "backbone": {
            "name": backbone.name,
            "pretrained": backbone.pretrained,
            "key": backbone.key,
            "random_weights": backbone.random_weights,
        },
        "dataset": dataset.fingerprint(),
        "with_tokens": with_tokens,
        "shape": list(features.shape),
        **settings,
    }


def _write_entry(folder: Path, result: FeatureSet) -> None:
    tensors = {"features": result.features, "labels": result.labels, "indices": result.indices}
    if result.tokens is not None:
        tensors["tokens"] = result.tokens
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}

    # NOTE: tokens are large (a ViT-B/16 image is 197 x 768 floats, about 0.6 MB), so token
    # entries are meant for few-shot training splits rather than full test sets.
    atomic_write(folder / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / META_FILE, result.meta)
    logger.info("cached features in %s", folder)


def _read_entry(folder: Path, with_tokens: bool) -> FeatureSet | None:
    """Load a complete cache entry, or return None when it is absent or unreadable."""
    meta_path, tensors_path = folder / META_FILE, folder / TENSORS_FILE
    if not (meta_path.is_file() and tensors_path.is_file()):
        return None

    try:
        meta = read_json(meta_path)
        with safe_open(str(tensors_path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            tensors = {name: f.get_tensor(name) for name in ("features", "labels", "indices")}
            tokens = f.get_tensor("tokens") if with_tokens and "tokens" in names else None
    except Exception as e:  # a damaged entry is recomputed, never trusted
        logger.warning("ignoring unreadable feature cache %s: %s", folder, e)
        return None

    if with_tokens and tokens is None:
        return None
    meta = {**meta, "with_tokens": with_tokens}
    return FeatureSet(tokens=tokens, meta=meta, **tensors)
