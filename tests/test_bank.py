"""Tests of the confusion bank: counts, pair queries, validation, save/load and the cache."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from capt_lib.confusion.bank import (
    METADATA_FILE,
    TENSORS_FILE,
    ConfusionBank,
    build_confusion_bank,
    load_or_build_bank,
    rank_confusion_pairs,
)
from capt_lib.utils.cache import content_key, file_sha256

CLASSNAMES = ("cat", "dog", "fox")
# Eight training images of three classes, with the base model's top-1 prediction.
TRUE = [0, 0, 0, 1, 1, 1, 2, 2]
PRED = [0, 1, 1, 0, 1, 2, 2, 1]
SAMPLE_IDS = [40, 7, 13, 2, 99, 5, 61, 8]
# Worked out by hand from TRUE and PRED: cat->dog twice, dog->cat, dog->fox and fox->dog once.
EXPECTED_COUNTS = [
    [0, 2, 0],
    [1, 0, 1],
    [0, 1, 0],
]


def one_hot_probs(predictions, num_classes=3):
    """Rows of 0.1 with 0.8 at the predicted class; with 3 classes they sum to 1."""
    probs = torch.full((len(predictions), num_classes), 0.1)
    probs[torch.arange(len(predictions)), torch.tensor(predictions)] = 0.8
    return probs


def unit_features(num_images, dim=4, seed=0):
    features = torch.randn(num_images, dim, generator=torch.Generator().manual_seed(seed))
    return features / features.norm(dim=1, keepdim=True)


def make_bank(patch_tokens=None, meta=None):
    return ConfusionBank.from_predictions(
        true_labels=torch.tensor(TRUE),
        probs=one_hot_probs(PRED),
        features=unit_features(len(TRUE)),
        sample_ids=torch.tensor(SAMPLE_IDS),
        classnames=CLASSNAMES,
        patch_tokens=patch_tokens,
        meta=meta if meta is not None else {"backbone": "toy", "seed": 1},
    )


def assert_banks_equal(left, right):
    assert left.classnames == right.classnames
    assert left.meta == right.meta
    for name in ("true_labels", "pseudo_labels", "probs", "features", "sample_ids", "counts"):
        assert torch.equal(getattr(left, name), getattr(right, name)), name
    if left.patch_tokens is None:
        assert right.patch_tokens is None
    else:
        assert torch.equal(left.patch_tokens, right.patch_tokens)


def test_counts_hand_example():
    bank = make_bank()
    assert bank.counts.tolist() == EXPECTED_COUNTS
    assert bank.counts.dtype == torch.int64


def test_counts_exclude_diagonal():
    bank = make_bank()
    # Three of the eight images are classified correctly, yet the diagonal counts none of them.
    assert torch.diagonal(bank.counts).tolist() == [0, 0, 0]
    assert int(bank.counts.sum()) == 5


def test_pseudo_labels_are_argmax():
    bank = make_bank()
    assert bank.pseudo_labels.tolist() == PRED


def test_confused_mask():
    bank = make_bank()
    assert bank.confused_mask.tolist() == [False, True, True, True, False, True, False, True]


def test_pair_rows_and_sample_ids():
    bank = make_bank()
    assert bank.pair_rows(0, 1).tolist() == [1, 2]
    assert bank.pair_sample_ids(0, 1).tolist() == [7, 13]
    assert bank.pair_rows(1, 0).tolist() == [3]
    assert bank.pair_sample_ids(2, 1).tolist() == [8]
    assert bank.pair_rows(0, 2).tolist() == []


def test_pair_rows_rejects_bad_pairs():
    bank = make_bank()
    with pytest.raises(ValueError, match="two different classes"):
        bank.pair_rows(1, 1)
    with pytest.raises(ValueError, match=r"out of range \[0, 3\)"):
        bank.pair_rows(0, 3)


def test_top_pairs_order_and_ties():
    bank = make_bank()
    # cat->dog (2) first, then the three pairs with count 1 in (a, b) order.
    assert bank.top_pairs() == [(0, 1, 2), (1, 0, 1), (1, 2, 1), (2, 1, 1)]
    assert bank.top_pairs(2) == [(0, 1, 2), (1, 0, 1)]
    assert bank.top_pairs(10) == bank.top_pairs()


def test_top_pairs_symmetric():
    bank = make_bank()
    # {cat, dog}: 2 + 1 = 3; {dog, fox}: 1 + 1 = 2; {cat, fox}: 0, so left out.
    assert bank.top_pairs(symmetric=True) == [(0, 1, 3), (1, 2, 2)]


def test_rank_pairs_matches_sorting():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(7, 7))
    expected = sorted(
        ((a, b, int(counts[a, b])) for a in range(7) for b in range(7) if a != b and counts[a, b] > 0),
        key=lambda item: (-item[2], item[0], item[1]),
    )
    assert rank_confusion_pairs(counts) == expected
    assert rank_confusion_pairs(counts, 5) == expected[:5]


def test_rank_pairs_rejects_bad_k():
    with pytest.raises(ValueError, match="k=-1"):
        rank_confusion_pairs(np.zeros((2, 2), dtype=int), -1)


def test_confusion_rate():
    bank = make_bank()
    rate = bank.confusion_rate()
    assert rate.tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 2])


def test_confusion_rate_class_without_images():
    bank = ConfusionBank.from_predictions(
        true_labels=[0, 1],
        probs=one_hot_probs([1, 1]),
        features=unit_features(2),
        sample_ids=[0, 1],
        classnames=CLASSNAMES,
    )
    rate = bank.confusion_rate()
    assert rate[0].item() == 1.0
    assert rate[1].item() == 0.0
    assert math.isnan(rate[2].item())


def test_from_predictions_copies_inputs():
    labels = torch.tensor(TRUE)
    bank = ConfusionBank.from_predictions(labels, one_hot_probs(PRED), unit_features(8), SAMPLE_IDS, CLASSNAMES)
    labels[0] = 2
    assert bank.true_labels[0].item() == 0


def test_build_from_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    features = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    bank = build_confusion_bank(logits, [0, 1], features, [5, 6], CLASSNAMES, meta={"seed": 0})
    # softmax([2, 0, 0]) = [e^2, 1, 1] / (e^2 + 2)
    expected_first = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    assert bank.probs[0].tolist() == pytest.approx(expected_first, rel=1e-6)
    assert bank.pseudo_labels.tolist() == [0, 2]
    assert bank.features[0].tolist() == pytest.approx([0.6, 0.8])
    assert bank.features[1].tolist() == pytest.approx([0.0, -1.0])
    assert bank.counts.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_build_rejects_zero_feature():
    with pytest.raises(ValueError, match="cannot be normalised"):
        build_confusion_bank(torch.zeros(1, 3), [0], torch.zeros(1, 2), [0], CLASSNAMES)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"probs": torch.full((8, 3), 0.5)}, "sum to 1"),
        ({"probs": torch.full((8, 3), 1 / 3) * torch.tensor([[-1.0, 2.0, 2.0]])}, "negative"),
        ({"features": 2 * unit_features(8)}, "L2-normalised"),
        ({"true_labels": torch.tensor([0, 0, 0, 1, 1, 1, 2, 3])}, r"must lie in \[0, 3\)"),
        ({"true_labels": torch.tensor(TRUE[:7])}, "true_labels must have shape"),
        ({"true_labels": torch.tensor(TRUE, dtype=torch.float32)}, "must contain integers"),
        ({"sample_ids": torch.tensor([1, 1, 2, 3, 4, 5, 6, 7])}, "duplicates"),
        ({"sample_ids": torch.tensor(SAMPLE_IDS[:7])}, "sample_ids has 7 rows"),
        ({"features": unit_features(7)}, "features has 7 rows"),
        ({"classnames": ("cat", "dog")}, "3 columns but there are 2 class names"),
        ({"classnames": ("cat", "dog", "dog")}, "duplicates"),
        ({"meta": {"path": object()}}, "JSON-serialisable"),
    ],
)
def test_from_predictions_validation(change, message):
    inputs = {
        "true_labels": torch.tensor(TRUE),
        "probs": one_hot_probs(PRED),
        "features": unit_features(8),
        "sample_ids": torch.tensor(SAMPLE_IDS),
        "classnames": CLASSNAMES,
    }
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        ConfusionBank.from_predictions(**inputs)


def test_constructor_rejects_wrong_counts():
    bank = make_bank()
    tampered = bank.counts.clone()
    tampered[0, 2] = 5
    with pytest.raises(ValueError, match="counts do not match"):
        ConfusionBank(
            classnames=bank.classnames,
            true_labels=bank.true_labels,
            pseudo_labels=bank.pseudo_labels,
            probs=bank.probs,
            features=bank.features,
            sample_ids=bank.sample_ids,
            counts=tampered,
        )


def test_save_load_round_trip(tmp_path):
    bank = make_bank(meta={"backbone": "toy", "dataset": {"name": "fashion_mnist", "n": 8}, "seed": 3})
    bank.save(tmp_path / "bank")
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == [METADATA_FILE, TENSORS_FILE]
    assert_banks_equal(bank, ConfusionBank.load(tmp_path / "bank"))


def test_save_load_with_patch_tokens(tmp_path):
    tokens = torch.randn(8, 5, 6, generator=torch.Generator().manual_seed(1))  # (N, 1 + HW, D)
    bank = make_bank(patch_tokens=tokens)
    bank.save(tmp_path)
    loaded = ConfusionBank.load(tmp_path)
    assert_banks_equal(bank, loaded)
    assert loaded.patch_tokens.shape == (8, 5, 6)


def test_meta_tuples_survive_round_trip(tmp_path):
    bank = make_bank(meta={"image_size": (28, 28), "seed": 1})
    assert bank.meta == {"image_size": [28, 28], "seed": 1}
    bank.save(tmp_path)
    assert ConfusionBank.load(tmp_path).meta == bank.meta


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        ConfusionBank.load(tmp_path / "nowhere")


def test_load_missing_tensor_file(tmp_path):
    make_bank().save(tmp_path)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=TENSORS_FILE):
        ConfusionBank.load(tmp_path)


def test_load_corrupt_tensor_file_names_file(tmp_path):
    make_bank().save(tmp_path)
    tensor_path = tmp_path / TENSORS_FILE
    tensor_path.write_bytes(tensor_path.read_bytes()[:-7])
    with pytest.raises(RuntimeError, match=str(tensor_path)):
        ConfusionBank.load(tmp_path)


def test_load_unreadable_tensor_file_names_file(tmp_path):
    make_bank().save(tmp_path)
    tensor_path = tmp_path / TENSORS_FILE
    tensor_path.write_bytes(b"not a safetensors file")
    header = json.loads((tmp_path / METADATA_FILE).read_text())
    header["tensors_sha256"] = file_sha256(tensor_path)  # so the checksum passes and the reader fails
    (tmp_path / METADATA_FILE).write_text(json.dumps(header))
    with pytest.raises(RuntimeError, match="failed to read confusion bank tensors") as info:
        ConfusionBank.load(tmp_path)
    assert str(tensor_path) in str(info.value)
    assert info.value.__cause__ is not None


def test_load_corrupt_json_names_file(tmp_path):
    make_bank().save(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(RuntimeError, match=str(tmp_path / METADATA_FILE)):
        ConfusionBank.load(tmp_path)


def test_load_version_mismatch(tmp_path):
    make_bank().save(tmp_path)
    header = json.loads((tmp_path / METADATA_FILE).read_text())
    header["format_version"] = 999
    (tmp_path / METADATA_FILE).write_text(json.dumps(header))
    with pytest.raises(ValueError, match="format version 999"):
        ConfusionBank.load(tmp_path)


def test_load_detects_swapped_tensor_file(tmp_path):
    make_bank().save(tmp_path / "first")
    other = ConfusionBank.from_predictions([0], one_hot_probs([0]), unit_features(1), [0], CLASSNAMES)
    other.save(tmp_path / "second")
    (tmp_path / "first" / TENSORS_FILE).write_bytes((tmp_path / "second" / TENSORS_FILE).read_bytes())
    with pytest.raises(RuntimeError, match="does not match the SHA-256"):
        ConfusionBank.load(tmp_path / "first")


def test_load_or_build_builds_once(tmp_path, caplog):
    calls = []

    def build():
        calls.append(1)
        return make_bank()

    key_inputs = {"backbone": "toy", "base_model": "zero-shot", "split": "abc", "seed": 1}
    with caplog.at_level(logging.INFO, logger="capt_lib.confusion.bank"):
        first = load_or_build_bank(key_inputs, build, cache_dir=tmp_path)
        second = load_or_build_bank(key_inputs, build, cache_dir=tmp_path)
    assert len(calls) == 1
    assert_banks_equal(first, second)
    assert (tmp_path / "banks" / content_key(key_inputs) / METADATA_FILE).exists()
    assert "Building confusion bank" in caplog.text
    assert "Using cached confusion bank" in caplog.text


def test_load_or_build_rebuilds_on_new_key(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return make_bank()

    load_or_build_bank({"backbone": "toy", "seed": 1}, build, cache_dir=tmp_path)
    load_or_build_bank({"backbone": "toy", "seed": 2}, build, cache_dir=tmp_path)
    assert len(calls) == 2
    assert len(list((tmp_path / "banks").iterdir())) == 2


def test_load_or_build_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="non-empty dict"):
        load_or_build_bank({}, make_bank, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="must return a ConfusionBank"):
        load_or_build_bank({"seed": 1}, lambda: "not a bank", cache_dir=tmp_path)
