import numpy as np
import pytest

from capt_lib.data.dataset import ClassificationDataset
from capt_lib.data.styles import DOWNSTREAM_STYLE, STYLE_CAPTION_WORDS, STYLES, apply_style, stylize


def tiny_dataset(images: np.ndarray) -> ClassificationDataset:
    n = len(images)
    return ClassificationDataset(
        name="tiny",
        split="test",
        classnames=("a", "b"),
        labels=np.arange(n, dtype=np.int64) % 2,
        indices=np.arange(n, dtype=np.int64),
        images=images,
    )


def test_negative_by_hand():
    images = np.array([[[0, 255], [10, 200]]], dtype=np.uint8)
    expected = np.array([[[255, 0], [245, 55]]], dtype=np.uint8)
    np.testing.assert_array_equal(apply_style(images, "negative"), expected)


def test_upside_down_reverses_rows():
    images = np.array([[[1, 2], [3, 4], [5, 6]]], dtype=np.uint8)
    expected = np.array([[[5, 6], [3, 4], [1, 2]]], dtype=np.uint8)
    np.testing.assert_array_equal(apply_style(images, "upside_down"), expected)


def test_blur_of_single_pixel_by_hand():
    # 128 * (k_i * k_j) / 256 with k = [1, 4, 6, 4, 1], rounded half up.
    images = np.zeros((1, 5, 5), dtype=np.uint8)
    images[0, 2, 2] = 128
    expected = np.array(
        [
            [1, 2, 3, 2, 1],
            [2, 8, 12, 8, 2],
            [3, 12, 18, 12, 3],
            [2, 8, 12, 8, 2],
            [1, 2, 3, 2, 1],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(apply_style(images, "blur")[0], expected)


def test_blur_of_constant_image_darkens_border_only():
    images = np.full((1, 9, 9), 100, dtype=np.uint8)
    blurred = apply_style(images, "blur")[0]
    assert blurred[4, 4] == 100
    # Corner: 11/16 of the kernel lies inside along each axis, so 100 * 121 / 256 = 47.3.
    assert blurred[0, 0] == 47


def test_plain_copies():
    images = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    styled = apply_style(images, "plain")
    np.testing.assert_array_equal(styled, images)
    styled[0, 0, 0] = 99
    assert images[0, 0, 0] == 0


def test_noisy_depends_on_seed_only():
    images = np.full((2, 6, 6), 128, dtype=np.uint8)
    first = apply_style(images, "noisy", seed=3)
    np.testing.assert_array_equal(first, apply_style(images, "noisy", seed=3))
    assert not np.array_equal(first, apply_style(images, "noisy", seed=4))
    assert first.dtype == np.uint8
    assert 10 < np.abs(first.astype(int) - 128).mean() < 60  # std-40 noise has mean |x| of about 32


def test_rgb_images_supported():
    images = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    assert apply_style(images, "negative").shape == (1, 2, 2, 3)
    assert (apply_style(images, "negative") == 255).all()


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="'sepia' is unknown; choose one of"):
        apply_style(np.zeros((1, 2, 2), dtype=np.uint8), "sepia")
    with pytest.raises(ValueError, match="uint8"):
        apply_style(np.zeros((1, 2, 2), dtype=np.float32), "negative")


def test_stylize_renames_and_keeps_labels():
    images = np.array([[[0, 255]], [[10, 20]]], dtype=np.uint8)
    dataset = tiny_dataset(images)
    styled = stylize(dataset, "negative")
    assert styled.name == "tiny-negative"
    np.testing.assert_array_equal(styled.labels, dataset.labels)
    np.testing.assert_array_equal(styled.images, 255 - images)
    np.testing.assert_array_equal(dataset.images, images)
    assert styled.fingerprint() != dataset.fingerprint()


def test_stylize_random_style_names_seed():
    dataset = tiny_dataset(np.zeros((2, 2, 2), dtype=np.uint8))
    assert stylize(dataset, "noisy", seed=5).name == "tiny-noisy-seed5"


def test_stylize_plain_returns_same_dataset():
    dataset = tiny_dataset(np.zeros((2, 2, 2), dtype=np.uint8))
    assert stylize(dataset, "plain") is dataset


def test_stylize_rejects_paths_and_unknown_style():
    dataset = tiny_dataset(np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="unknown"):
        stylize(dataset, "sepia")
    on_disk = ClassificationDataset(
        name="disk", split="test", classnames=("a",), labels=np.zeros(1, dtype=np.int64),
        indices=np.zeros(1, dtype=np.int64), paths=("x.png",),
    )
    with pytest.raises(ValueError, match="in-memory images"):
        stylize(on_disk, "blur")


def test_every_style_has_caption_word():
    assert DOWNSTREAM_STYLE in STYLES
    assert set(STYLES) == set(STYLE_CAPTION_WORDS)
    assert STYLE_CAPTION_WORDS["plain"] == ""
    assert all(STYLE_CAPTION_WORDS[s] for s in STYLES if s != "plain")
