"""Image styles for uint8 images, and the style the offline downstream task is shown in.

MiniCLIP is pretrained on Fashion-MNIST images in several styles, and many captions
name their image's style ("a negative photo of a coat"). The downstream task then
uses one style that a plain prompt such as "a photo of a coat." does not name, so a
zero-shot model leaves room that prompt tuning can close. This mirrors web-pretrained
CLIP meeting sketches or renditions of familiar objects.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from capt_lib.data.dataset import ClassificationDataset

# Word that a pretraining caption uses to name each style ("" for none).
STYLE_CAPTION_WORDS = {
    "plain": "",
    "negative": "negative",
    "blur": "blurred",
    "upside_down": "upside-down",
    "noisy": "noisy",
}
STYLES = tuple(STYLE_CAPTION_WORDS)
RANDOM_STYLES = frozenset({"noisy"})  # styles whose output depends on the seed

# The style of every offline downstream split (train pool, val and test). MiniCLIP's
# captions name this style for most but not all upside-down images, and the plain
# prompt "a photo of a {}." never names it, so zero-shot transfer is imperfect and a
# learned context has something to learn (notebook 01 measures the headroom).
DOWNSTREAM_STYLE = "upside_down"

# Binomial approximation of a Gaussian with sigma = 1 pixel, with weights summing to 16.
_BLUR_KERNEL = np.array([1, 4, 6, 4, 1], dtype=np.int64)
_NOISE_STD = 40.0  # grey levels of the "noisy" style's Gaussian noise


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"images must be a uint8 array of shape (N, H, W) or (N, H, W, C), "
            f"got dtype {images.dtype} and shape {images.shape}"
        )


def _blur_axis(images: np.ndarray, axis: int) -> np.ndarray:
    # Zero padding matches Fashion-MNIST's black background.
    radius = len(_BLUR_KERNEL) // 2
    pad = [(0, 0)] * images.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(images, pad)

    out = np.zeros(images.shape, dtype=np.int64)
    size = images.shape[axis]
    for offset, weight in enumerate(_BLUR_KERNEL):
        out += weight * np.take(padded, np.arange(offset, offset + size), axis=axis)
    return out


def _blur(images: np.ndarray) -> np.ndarray:
    rows_blurred = _blur_axis(images.astype(np.int64), axis=1)
    both_blurred = _blur_axis(rows_blurred, axis=2)  # weights now sum to 16 * 16
    return ((both_blurred + 128) // 256).astype(np.uint8)  # round half up


def _noisy(images: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, _NOISE_STD, size=images.shape)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


def apply_style(images: np.ndarray, style: str, seed: int = 0) -> np.ndarray:
    """Return a restyled copy of uint8 ``images`` (N, H, W) or (N, H, W, C).

    The styles are:

    - "plain": unchanged;
    - "negative": 255 - value;
    - "blur": a separable [1, 4, 6, 4, 1] / 16 kernel with zero padding, rounded half up;
    - "upside_down": rows reversed;
    - "noisy": Gaussian noise with std 40 grey levels drawn from ``seed``, rounded and clipped.

    Only "noisy" reads ``seed``.
    """
    _check_images(images)
    if style == "plain":
        return images.copy()
    if style == "negative":
        return 255 - images
    if style == "blur":
        return _blur(images)
    if style == "upside_down":
        return np.ascontiguousarray(images[:, ::-1])
    if style == "noisy":
        return _noisy(images, seed)
    raise ValueError(f"style={style!r} is unknown; choose one of {list(STYLES)}")


def stylize(dataset: ClassificationDataset, style: str, seed: int = 0) -> ClassificationDataset:
    """Return ``dataset`` with its images in ``style``, renamed so fingerprints and cache keys differ.

    The name gets the suffix ``-<style>`` ("fashion_mnist-blur"), and random styles add
    ``-seed<seed>``. "plain" returns the dataset unchanged, name included, because the
    content is the same.
    """
    if dataset.images is None:
        raise ValueError(f"{dataset.name}/{dataset.split}: stylize needs in-memory images, but this dataset has paths")
    if style not in STYLE_CAPTION_WORDS:
        raise ValueError(f"style={style!r} is unknown; choose one of {list(STYLES)}")
    if style == "plain":
        return dataset

    suffix = f"-{style}-seed{seed}" if style in RANDOM_STYLES else f"-{style}"
    return dataclasses.replace(dataset, name=dataset.name + suffix, images=apply_style(dataset.images, style, seed))
