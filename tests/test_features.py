"""Tests for capt_lib.backbones.features: values, cache reuse, cache keys, tokens and augmented views."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from capt_lib.backbones.base import Backbone
from capt_lib.backbones.features import crop_flip, encode_dataset, flip
from capt_lib.data.dataset import ClassificationDataset

NUM_IMAGES = 10
GRID = 4  # 28 px images in 7 px patches


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A minimal preprocess: RGB uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def make_backbone(model: torch.nn.Module, preprocess, image_size: int, key: str) -> Backbone:
    model = model.eval().requires_grad_(False)
    return Backbone(
        model=model,
        tokenizer=lambda texts: torch.zeros(len(texts), 16, dtype=torch.long),
        preprocess=preprocess,
        name="tiny",
        pretrained=None,
        key=key,
        image_size=image_size,
        context_length=16,
    )


@pytest.fixture
def backbone() -> Backbone:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1),
    )
    return make_backbone(model, to_tensor, 28, key="tiny-vit")


@pytest.fixture
def dataset() -> ClassificationDataset:
    rng = np.random.default_rng(0)
    return ClassificationDataset(
        name="toy",
        split="train",
        classnames=("a", "b", "c"),
        labels=rng.integers(0, 3, NUM_IMAGES).astype(np.int64),
        indices=np.arange(NUM_IMAGES, dtype=np.int64) * 3 + 5,
        images=rng.integers(0, 256, (NUM_IMAGES, 28, 28), dtype=np.uint8),
    )


def count_encoder_calls(backbone: Backbone) -> list[int]:
    """Wrap the backbone's image-tower entry points so each call appends its batch size."""
    calls = []
    visual_tokens, encode_image = backbone.visual_tokens, backbone.model.encode_image

    def counted_visual_tokens(images):
        calls.append(len(images))
        return visual_tokens(images)

    def counted_encode_image(images, *args, **kwargs):
        calls.append(len(images))
        return encode_image(images, *args, **kwargs)

    backbone.visual_tokens = counted_visual_tokens
    backbone.model.encode_image = counted_encode_image
    return calls


def direct_features(backbone: Backbone, images: list[Image.Image]) -> torch.Tensor:
    """The obvious computation: preprocess, model.encode_image, L2 normalisation."""
    batch = torch.stack([backbone.preprocess(image) for image in images])
    with torch.no_grad():
        return F.normalize(backbone.model.encode_image(batch), dim=-1)


def images_of(dataset: ClassificationDataset) -> list[Image.Image]:
    return [dataset.load_image(i) for i in range(len(dataset))]


def test_features_match_encode_image(backbone, dataset, tmp_path):
    result = encode_dataset(backbone, dataset, batch_size=4, cache_dir=tmp_path)

    expected = direct_features(backbone, images_of(dataset))
    assert result.features.shape == (NUM_IMAGES, 32)
    assert result.features.dtype == torch.float32
    torch.testing.assert_close(result.features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.features.norm(dim=-1), torch.ones(NUM_IMAGES))
    assert result.labels.tolist() == dataset.labels.tolist()
    assert result.indices.tolist() == dataset.indices.tolist()
    assert result.tokens is None
    assert len(result) == NUM_IMAGES


def test_batches_cover_dataset(backbone, dataset, tmp_path):
    calls = count_encoder_calls(backbone)
    encode_dataset(backbone, dataset, batch_size=4, cache_dir=tmp_path)
    assert calls == [4, 4, 2]


def test_cache_hit_skips_model(backbone, dataset, tmp_path):
    first = encode_dataset(backbone, dataset, batch_size=4, cache_dir=tmp_path)
    calls = count_encoder_calls(backbone)
    second = encode_dataset(backbone, dataset, batch_size=4, cache_dir=tmp_path)

    assert calls == []
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.labels, first.labels)
    assert torch.equal(second.indices, first.indices)
    assert second.meta["key"] == first.meta["key"]


def test_cache_entry_layout(backbone, dataset, tmp_path):
    result = encode_dataset(backbone, dataset, cache_dir=tmp_path)

    folder = tmp_path / "features" / result.meta["key"]
    assert sorted(p.name for p in folder.iterdir()) == ["features.safetensors", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["backbone"]["key"] == "tiny-vit"
    assert meta["dataset"]["indices_sha"] == dataset.fingerprint()["indices_sha"]
    assert meta["shape"] == [NUM_IMAGES, 32]
    assert meta["precision"] == "fp32"


def test_incomplete_entry_is_recomputed(backbone, dataset, tmp_path):
    # A tensors file without meta.json is what a run killed between the two writes leaves.
    first = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    (tmp_path / "features" / first.meta["key"] / "meta.json").unlink()

    calls = count_encoder_calls(backbone)
    second = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    assert calls == [NUM_IMAGES]
    assert torch.equal(second.features, first.features)


def test_corrupt_entry_is_recomputed(backbone, dataset, tmp_path):
    first = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    (tmp_path / "features" / first.meta["key"] / "features.safetensors").write_bytes(b"garbage")

    calls = count_encoder_calls(backbone)
    second = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    assert calls == [NUM_IMAGES]
    assert torch.equal(second.features, first.features)


def test_subset_gets_own_key(backbone, dataset, tmp_path):
    full = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    subset = dataset.subset([1, 4, 7])
    part = encode_dataset(backbone, subset, cache_dir=tmp_path)

    assert part.meta["key"] != full.meta["key"]
    assert len(list((tmp_path / "features").iterdir())) == 2
    torch.testing.assert_close(part.features, full.features[[1, 4, 7]], atol=1e-5, rtol=1e-5)
    assert part.indices.tolist() == dataset.indices[[1, 4, 7]].tolist()


def test_other_pixels_get_own_key(backbone, dataset, tmp_path):
    # Same name, split, labels and indices: only the in-memory pixels differ.
    changed = ClassificationDataset(
        name=dataset.name,
        split=dataset.split,
        classnames=dataset.classnames,
        labels=dataset.labels,
        indices=dataset.indices,
        images=255 - dataset.images,
    )
    original = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    inverted = encode_dataset(backbone, changed, cache_dir=tmp_path)

    assert inverted.meta["key"] != original.meta["key"]
    torch.testing.assert_close(inverted.features, direct_features(backbone, images_of(changed)), atol=1e-5, rtol=1e-5)


def test_other_backbone_gets_own_key(backbone, dataset, tmp_path):
    first = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    backbone.key = "another-weights-key"
    second = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    assert second.meta["key"] != first.meta["key"]


def test_tokens_shape_and_values(backbone, dataset, tmp_path):
    result = encode_dataset(backbone, dataset, batch_size=3, cache_dir=tmp_path, with_tokens=True)

    batch = torch.stack([backbone.preprocess(image) for image in images_of(dataset)])
    with torch.no_grad():
        expected_tokens = backbone.visual_tokens(batch)
        pooled_again = F.normalize(backbone.visual_head(result.tokens), dim=-1)
    assert result.tokens.shape == (NUM_IMAGES, 1 + GRID * GRID, 32)
    assert result.tokens.dtype == torch.float32
    torch.testing.assert_close(result.tokens, expected_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_again, result.features, atol=1e-5, rtol=1e-5)


def test_token_entry_serves_plain_request(backbone, dataset, tmp_path):
    with_tokens = encode_dataset(backbone, dataset, cache_dir=tmp_path, with_tokens=True)
    calls = count_encoder_calls(backbone)
    plain = encode_dataset(backbone, dataset, cache_dir=tmp_path)

    assert calls == []
    assert plain.tokens is None
    assert torch.equal(plain.features, with_tokens.features)


def test_plain_entry_cannot_serve_tokens(backbone, dataset, tmp_path):
    encode_dataset(backbone, dataset, cache_dir=tmp_path)
    calls = count_encoder_calls(backbone)
    result = encode_dataset(backbone, dataset, cache_dir=tmp_path, with_tokens=True)

    assert calls == [NUM_IMAGES]
    assert result.tokens.shape == (NUM_IMAGES, 1 + GRID * GRID, 32)


def test_bf16_precision(backbone, dataset, tmp_path):
    fp32 = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    bf16 = encode_dataset(backbone, dataset, cache_dir=tmp_path, precision="bf16")

    assert bf16.meta["key"] != fp32.meta["key"]
    assert bf16.features.dtype == torch.float32
    # bf16 carries 8 significant bits, so the unit vectors agree to about 1e-2 per component.
    torch.testing.assert_close(bf16.features, fp32.features, atol=3e-2, rtol=0)
    assert not torch.equal(bf16.features, fp32.features)


def test_backbone_precision_is_default(backbone, dataset, tmp_path):
    backbone.info["precision"] = "bf16"
    result = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    assert result.meta["precision"] == "bf16"


def test_flip_views(backbone, dataset, tmp_path):
    result = encode_dataset(backbone, dataset, cache_dir=tmp_path, views=3, augment="flip")

    plain = direct_features(backbone, images_of(dataset))
    mirrored = direct_features(backbone, [ImageOps.mirror(image) for image in images_of(dataset)])
    assert result.features.shape == (3, NUM_IMAGES, 32)
    flipped_count = 0
    for view in range(3):
        for i in range(NUM_IMAGES):
            is_plain = torch.allclose(result.features[view, i], plain[i], atol=1e-5)
            is_mirrored = torch.allclose(result.features[view, i], mirrored[i], atol=1e-5)
            assert is_plain or is_mirrored, (view, i)
            flipped_count += int(is_mirrored and not is_plain)
    # Each of the 30 draws flips with probability 1/2: all 30 plain or all 30 flipped has odds 2**-29.
    assert 0 < flipped_count < 3 * NUM_IMAGES


def test_views_follow_source_index(backbone, dataset, tmp_path):
    full = encode_dataset(backbone, dataset, cache_dir=tmp_path / "a", views=2, augment="crop_flip", with_tokens=True)
    again = encode_dataset(backbone, dataset, cache_dir=tmp_path / "b", views=2, augment="crop_flip", with_tokens=True)
    part = encode_dataset(backbone, dataset.subset([2, 5]), cache_dir=tmp_path / "a", views=2, augment="crop_flip")

    assert full.tokens.shape == (2, NUM_IMAGES, 1 + GRID * GRID, 32)
    assert torch.equal(again.features, full.features)
    torch.testing.assert_close(part.features, full.features[:, [2, 5]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full.features[0], full.features[1], atol=1e-3)


def test_flip_by_hand():
    image = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    mirrored_pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)[:, ::-1]
    outcomes = set()
    for seed in range(20):
        pixels = np.asarray(flip(image, torch.Generator().manual_seed(seed)))
        assert np.array_equal(pixels, np.asarray(image)) or np.array_equal(pixels, mirrored_pixels)
        outcomes.add(np.array_equal(pixels, mirrored_pixels))
    assert outcomes == {True, False}


def test_crop_flip_keeps_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for seed in range(10):
        augmented = crop_flip(image, torch.Generator().manual_seed(seed))
        assert augmented.size == (40, 30)
        assert augmented.mode == "RGB"


def test_resnet_tower_without_tokens(dataset, tmp_path):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=8),
        text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1),
    )
    backbone = make_backbone(model, lambda image: to_tensor(image.resize((32, 32))), 32, key="tiny-resnet")

    result = encode_dataset(backbone, dataset, cache_dir=tmp_path)
    expected = direct_features(backbone, images_of(dataset))
    torch.testing.assert_close(result.features, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ModifiedResNet"):
        encode_dataset(backbone, dataset, cache_dir=tmp_path, with_tokens=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"views": 2}, "views=2 needs an augmentation"),
        ({"views": 0, "augment": "flip"}, "views=0 is invalid"),
        ({"augment": "rotate"}, r"augment='rotate' is not a known augmentation. Choose one of \['crop_flip', 'flip'\]"),
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"precision": "fp64"}, "precision='fp64'"),
    ],
)
def test_invalid_arguments(backbone, dataset, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_dataset(backbone, dataset, cache_dir=tmp_path, **kwargs)


def test_empty_dataset(backbone, dataset, tmp_path):
    with pytest.raises(ValueError, match="toy/train is empty"):
        encode_dataset(backbone, dataset.subset([]), cache_dir=tmp_path)

