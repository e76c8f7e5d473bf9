"""Tests of the data layer: loader, few-shot sampler, base/novel split."""

import gzip
import struct

import numpy as np
import pytest

from capt_lib.data import ClassificationDataset, load_fashion_mnist, sample_few_shot, split_base_novel
from capt_lib.data.fashion_mnist import DEBIAN_DIR, FASHION_MNIST_CLASSNAMES, find_fashion_mnist, read_idx
from capt_lib.data.splits import base_novel_labels


def make_dataset(labels, num_classes, name="toy"):
    labels = np.asarray(labels, dtype=np.int64)
    images = np.arange(len(labels) * 4, dtype=np.uint8).reshape(len(labels), 2, 2)
    return ClassificationDataset(
        name=name,
        split="train",
        classnames=tuple(f"class{i}" for i in range(num_classes)),
        labels=labels,
        indices=np.arange(len(labels), dtype=np.int64),
        images=images,
    )


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)

    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)


def test_read_idx_truncated_file_names_it(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\x00" * 3)

    with pytest.raises(ValueError, match="short.gz"):
        read_idx(path)


def test_loader_error_lists_searched_folders(tmp_path, monkeypatch):
    monkeypatch.setattr("capt_lib.data.fashion_mnist.DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.delenv("CAPT_FASHION_MNIST", raising=False)

    with pytest.raises(FileNotFoundError) as info:
        find_fashion_mnist(tmp_path / "mine")

    assert str(tmp_path / "mine") in str(info.value)
    assert str(tmp_path / "debian") in str(info.value)
    assert "dataset-fashion-mnist" in str(info.value)


def test_loader_prefers_given_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("capt_lib.data.fashion_mnist.EXPECTED_COUNTS", {"train": 3, "test": 2})
    for name, n in [("train", 3), ("t10k", 2)]:
        write_idx(tmp_path / f"{name}-images-idx3-ubyte.gz", np.full((n, 28, 28), 7))
        write_idx(tmp_path / f"{name}-labels-idx1-ubyte.gz", np.arange(n))

    dataset = load_fashion_mnist("train", root=tmp_path)

    assert len(dataset) == 3
    assert dataset.labels.tolist() == [0, 1, 2]
    assert dataset.images[0, 0, 0] == 7


def test_loader_rejects_unknown_split():
    with pytest.raises(ValueError, match="'validation'"):
        load_fashion_mnist("validation")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_counts():
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")

    assert train.images.shape == (60_000, 28, 28)
    assert test.images.shape == (10_000, 28, 28)
    # The official release is balanced: 6,000 training and 1,000 test images per class.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.classnames == FASHION_MNIST_CLASSNAMES


def test_few_shot_same_seed_same_images():
    dataset = make_dataset(np.repeat(np.arange(3), 20), 3)

    first = sample_few_shot(dataset, shots=4, seed=1)
    second = sample_few_shot(dataset, shots=4, seed=1)

    assert first.indices.tolist() == second.indices.tolist()
    assert np.bincount(first.labels).tolist() == [4, 4, 4]


def test_few_shot_other_seed_other_images():
    dataset = make_dataset(np.repeat(np.arange(3), 20), 3)

    first = sample_few_shot(dataset, shots=4, seed=1)
    second = sample_few_shot(dataset, shots=4, seed=2)

    assert first.indices.tolist() != second.indices.tolist()
    assert first.fingerprint() != second.fingerprint()


def test_few_shot_more_shots_contains_other_fingerprint():
    dataset = make_dataset(np.repeat(np.arange(3), 20), 3)

    assert sample_few_shot(dataset, 4, 1).fingerprint() != sample_few_shot(dataset, 8, 1).fingerprint()


def test_few_shot_small_class_keeps_all():
    dataset = make_dataset([0, 0, 0, 0, 0, 1, 1], 2)

    sampled = sample_few_shot(dataset, shots=4, seed=0)

    assert np.bincount(sampled.labels).tolist() == [4, 2]


def test_few_shot_empty_class_is_named():
    dataset = make_dataset([0, 0, 2, 2], 3)

    with pytest.raises(ValueError, match="class1"):
        sample_few_shot(dataset, shots=1, seed=0)


def test_few_shot_zero_shots_keeps_everything():
    dataset = make_dataset([0, 1, 1], 2)

    assert sample_few_shot(dataset, shots=0, seed=0) is dataset


def test_base_novel_seven_classes():
    # ceil(7 / 2) = 4 base classes (labels 0-3) and 3 novel classes (labels 4-6).
    assert base_novel_labels(7) == ([0, 1, 2, 3], [4, 5, 6])

    dataset = make_dataset([6, 0, 3, 4, 5, 1, 2, 6], 7)
    (base,) = split_base_novel(dataset, part="base")
    (novel,) = split_base_novel(dataset, part="novel")

    assert base.classnames == ("class0", "class1", "class2", "class3")
    assert base.labels.tolist() == [0, 3, 1, 2]
    assert base.indices.tolist() == [1, 2, 5, 6]
    assert novel.classnames == ("class4", "class5", "class6")
    assert novel.labels.tolist() == [2, 0, 1, 2]
    assert novel.indices.tolist() == [0, 3, 4, 7]


def test_base_novel_applies_train_classes_to_test():
    train = make_dataset([0, 1, 2, 3], 4)
    test = make_dataset([3, 2, 1, 0, 3], 4)

    train_novel, test_novel = split_base_novel(train, test, part="novel")

    assert train_novel.labels.tolist() == [0, 1]
    assert test_novel.labels.tolist() == [1, 0, 1]


def test_base_novel_one_class_is_an_error():
    with pytest.raises(ValueError, match="at least 2 classes"):
        split_base_novel(make_dataset([0, 0], 1), part="base")


def test_base_novel_class_without_images_is_named():
    with pytest.raises(ValueError, match="class2"):
        split_base_novel(make_dataset([0, 1, 3], 4), part="base")


def test_base_novel_rejects_unknown_part():
    with pytest.raises(ValueError, match="'new'"):
        split_base_novel(make_dataset([0, 1], 2), part="new")
