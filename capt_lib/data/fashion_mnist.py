"""Fashion-MNIST, the offline default dataset (Xiao, Rasul and Vollgraf, 2017).

The four gzip'd IDX files are looked for in a folder the caller gives, then in
``$CAPT_FASHION_MNIST``, then in Debian's ``/usr/share/datasets/fashion-mnist``
(package ``dataset-fashion-mnist``). Only when ``download=True`` are they fetched from
the dataset's public mirror into the caller's folder.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np

from capt_lib.data.dataset import ClassificationDataset

logger = logging.getLogger(__name__)

# Label order of the official release (github.com/zalandoresearch/fashion-mnist README).
FASHION_MNIST_CLASSNAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "CAPT_FASHION_MNIST"
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def candidate_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Return the folders searched for the IDX files, in order."""
    dirs = []
    if root is not None:
        dirs.append(Path(root))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(DEBIAN_DIR)
    return dirs


def find_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Return a folder that contains all four Fashion-MNIST files, downloading them if allowed."""
    searched = candidate_dirs(root)
    needed = [name for pair in FILES.values() for name in pair]
    for folder in searched:
        if all((folder / name).is_file() for name in needed):
            return folder

    if download:
        if root is None:
            raise ValueError("download=True needs a root folder to download Fashion-MNIST into")
        _download(Path(root), needed)
        return Path(root)

    looked = ", ".join(str(d) for d in searched)
    raise FileNotFoundError(
        f"Fashion-MNIST files ({', '.join(needed)}) not found; looked in: {looked}. "
        "Install the Debian package 'dataset-fashion-mnist', set $CAPT_FASHION_MNIST to a folder "
        "holding the files, or pass download=True with a root folder."
    )


def _download(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = root / name
        if target.is_file():
            continue
        logger.info("downloading %s into %s", name, root)
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(DOWNLOAD_URL + name, tmp)
        os.replace(tmp, target)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd IDX file (the MNIST container format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, n_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{n_dims}I", data[4 : 4 + 4 * n_dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: the header gives shape {shape} but the file has {body.size} bytes")
    return body.reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = False
) -> ClassificationDataset:
    """Load the Fashion-MNIST ``"train"`` (60,000) or ``"test"`` (10,000) split as 28x28 uint8 images."""
    if split not in FILES:
        raise ValueError(f"split={split!r} is invalid for Fashion-MNIST; choose one of {sorted(FILES)}")
    folder = find_fashion_mnist(root, download)

    image_file, label_file = FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file).astype(np.int64)
    if len(images) != EXPECTED_COUNTS[split] or len(labels) != len(images):
        raise ValueError(
            f"{folder}: expected {EXPECTED_COUNTS[split]} {split} images and labels, "
            f"found {len(images)} images and {len(labels)} labels"
        )

    return ClassificationDataset(
        name="fashion_mnist",
        split=split,
        classnames=FASHION_MNIST_CLASSNAMES,
        labels=labels,
        indices=np.arange(len(labels), dtype=np.int64),
        images=np.ascontiguousarray(images),
    )
