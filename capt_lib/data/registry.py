"""Datasets by name, split into the train/val/test roles every notebook uses.

``fashion_mnist`` is built in; every dataset with a manifest in ``data_manifests/``
(ImageNet, Caltech101, ...) is read from its CoOp-format folder under ``root``.

``fashion_mnist`` is the offline default. Its downstream task keeps MiniCLIP's
pretraining images out of every split: MiniCLIP pretrains on Fashion-MNIST training
images 0..49,999, so the downstream "train" pool is images 50,000..57,999, "val" is
58,000..59,999 and "test" is the official 10,000-image test set. All three are rendered
in ``capt_lib.data.styles.DOWNSTREAM_STYLE``, a style that the plain prompt does not
name, which leaves headroom for prompt tuning as a new benchmark does for web-pretrained
CLIP.

``fashion_mnist_<style>`` (for every style in ``capt_lib.data.styles.STYLES``, such as
``fashion_mnist_plain`` or ``fashion_mnist_upside_down``) names the same three splits
rendered in that style instead. These names are the offline targets of the transfer
protocols: a model trained on ``fashion_mnist`` is tested on the same classes in another
style, as an ImageNet model is tested on ImageNet-Sketch. The name of the downstream
style itself (``fashion_mnist_upside_down``) has the same images as ``fashion_mnist``.
"""

from __future__ import annotations

import os

import numpy as np

from capt_lib.data.dataset import ClassificationDataset
from capt_lib.data.fashion_mnist import load_fashion_mnist
from capt_lib.data.styles import STYLES

PRETRAIN_RANGE = (0, 50_000)  # Fashion-MNIST train images MiniCLIP may pretrain on
DOWNSTREAM_RANGES = {"train": (50_000, 58_000), "val": (58_000, 60_000)}
# Dataset name -> image style of the Fashion-MNIST downstream splits under that name.
FASHION_MNIST_STYLE_DATASETS = {f"fashion_mnist_{style}": style for style in STYLES}
DATASETS = ("fashion_mnist", *FASHION_MNIST_STYLE_DATASETS)


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    style: str | None = None,
    download: bool = False,
) -> ClassificationDataset:
    """Load split ``"train"``, ``"val"`` or ``"test"`` of dataset ``name``.

    For ``fashion_mnist``, ``style`` defaults to the downstream style; pass ``"plain"``
    for the original images. A ``fashion_mnist_<style>`` name fixes the style, so
    ``style`` must then be None or that same style.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is invalid; choose 'train', 'val' or 'test'")
    if name in FASHION_MNIST_STYLE_DATASETS:
        named_style = FASHION_MNIST_STYLE_DATASETS[name]
        if style is not None and style != named_style:
            raise ValueError(
                f"dataset {name!r} is Fashion-MNIST in the {named_style!r} style, but style={style!r} was passed; "
                f"pass style=None, or load 'fashion_mnist' with style={style!r}"
            )
        name, style = "fashion_mnist", named_style
    if name != "fashion_mnist":
        return _load_benchmark(name, split, root)

    from capt_lib.data.styles import DOWNSTREAM_STYLE, stylize

    if split == "test":
        dataset = load_fashion_mnist("test", root, download)
    else:
        full = load_fashion_mnist("train", root, download)
        start, stop = DOWNSTREAM_RANGES[split]
        dataset = full.subset(np.arange(start, stop))
        dataset = _rename_split(dataset, split)

    return stylize(dataset, style or DOWNSTREAM_STYLE)


def _load_benchmark(name: str, split: str, root: str | os.PathLike | None) -> ClassificationDataset:
    """Load a CoOp-format benchmark split. ``root`` is the folder that contains the dataset folders."""
    from capt_lib.data.manifest import list_datasets

    known = list_datasets()
    if name not in known:
        raise ValueError(f"unknown dataset {name!r}; available: {list(DATASETS) + known}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs data_root: the folder that contains its CoOp-format folder")

    from capt_lib.data.coop_datasets import load_coop_dataset

    return load_coop_dataset(name, root, split)


def load_pretraining_images(root: str | os.PathLike | None = None, download: bool = False) -> ClassificationDataset:
    """Return the Fashion-MNIST training images MiniCLIP pretrains on (images 0..49,999)."""
    full = load_fashion_mnist("train", root, download)
    return full.subset(np.arange(*PRETRAIN_RANGE))


def _rename_split(dataset: ClassificationDataset, split: str) -> ClassificationDataset:
    import dataclasses

    return dataclasses.replace(dataset, split=split)
