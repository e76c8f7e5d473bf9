import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from capt_lib.backbones import miniclip
from capt_lib.backbones.miniclip import (
    RECIPES,
    GreyPreprocess,
    MiniCLIPRecipe,
    build_model,
    build_tokenizer,
    caption_corpus,
    images_to_tensor,
    load_miniclip,
    miniclip_key,
)
from capt_lib.data.styles import STYLES

# Smaller than the "smoke" recipe, to keep each pretraining run in this file short.
TINY = MiniCLIPRecipe(
    embed_dim=16,
    vision_width=16,
    vision_layers=1,
    vision_head_width=8,
    text_width=16,
    text_heads=2,
    text_layers=1,
    num_images=256,
    epochs=1,
    batch_size=64,
)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("miniclip_cache")


@pytest.fixture(scope="module")
def tiny_backbone(tiny_cache):
    return load_miniclip(TINY, seed=0, cache_dir=tiny_cache)


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_recipes_registered():
    assert {"default", "smoke"} <= set(RECIPES)


def test_default_param_count_in_range():
    recipe = RECIPES["default"]
    model = build_model(recipe, build_tokenizer(recipe).vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 2_000_000


def test_default_vocabulary_covers_prompts():
    recipe = RECIPES["default"]
    tokenizer = build_tokenizer(recipe)
    texts = [text for *_, text in caption_corpus(list(STYLES))]
    assert tokenizer.unknown_tokens(texts) == []
    garment_words = "both have differs from sleeves collar buttons long short open closed heel laces strap handle legs zip hood toe ankle"
    assert tokenizer.unknown_tokens(garment_words) == []
    longest = max(len(tokenizer.encode(text)) + 2 for text in texts)
    assert longest <= recipe.context_length


def test_backbone_fields(tiny_backbone):
    b = tiny_backbone
    assert b.name == "MiniCLIP"
    assert b.pretrained == "miniclip-custom-seed0"
    assert b.key == miniclip_key(TINY, 0)
    assert b.image_size == 28
    assert b.context_length == TINY.context_length == b.model.context_length == b.tokenizer.context_length
    assert b.random_weights is False
    assert b.info["param_count"] == sum(p.numel() for p in b.model.parameters())
    assert b.info["pretrain_seconds"] > 0
    assert [entry["epoch"] for entry in b.info["pretrain_log"]] == [0]
    assert b.info["recipe"] == dataclasses.asdict(TINY)


def test_model_frozen(tiny_backbone):
    assert not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_eot_is_highest_id(tiny_backbone):
    tokens = tiny_backbone.tokenizer(["a photo of a coat.", "a blurred photo of a T-shirt/top with short sleeves."])
    assert tiny_backbone.tokenizer.eot_token_id == tiny_backbone.model.vocab_size - 1
    for row in tokens:
        assert int(row.argmax()) == row.tolist().index(tiny_backbone.tokenizer.eot_token_id)


def test_visual_split_matches_encode_image(tiny_backbone):
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        split = tiny_backbone.visual_head(tiny_backbone.visual_tokens(x))
        direct = tiny_backbone.model.encode_image(x)
    torch.testing.assert_close(split, direct, atol=1e-6, rtol=1e-6)
    assert tiny_backbone.visual_tokens(x).shape == (3, 1 + 16, TINY.vision_width)


def test_preprocess_matches_batch_transform():
    image = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256
    image = image.astype(np.uint8)
    from_pil = GreyPreprocess(28)(Image.fromarray(image).convert("RGB"))
    from_array = images_to_tensor(image[None])[0]
    assert from_pil.shape == (3, 28, 28)
    torch.testing.assert_close(from_pil, from_array)
    # Grey level 0 maps to -1 and 255 to +1 with mean 0.5 and std 0.5.
    assert float(from_array[0, 0, 0]) == -1.0
    assert float(from_array[0, 9, 3]) == pytest.approx((255 / 255 - 0.5) / 0.5)


def test_cache_reused_without_pretraining(tiny_backbone, tiny_cache, caplog, monkeypatch):
    weights = tiny_cache / "miniclip" / tiny_backbone.key / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("pretrain() called although the cache contains the weights")

    monkeypatch.setattr(miniclip, "pretrain", fail)
    with caplog.at_level(logging.INFO, logger="capt_lib.backbones.miniclip"):
        again = load_miniclip(TINY, seed=0, cache_dir=tiny_cache)
    assert "reusing cached MiniCLIP" in caplog.text
    assert weights.stat().st_mtime_ns == mtime
    assert state_dicts_equal(again.model, tiny_backbone.model)
    assert again.info["pretrain_seconds"] == tiny_backbone.info["pretrain_seconds"]


def test_same_seed_same_weights(tiny_backbone, tmp_path):
    fresh = load_miniclip(TINY, seed=0, cache_dir=tmp_path)
    assert state_dicts_equal(fresh.model, tiny_backbone.model)


def test_key_changes_with_recipe_and_seed():
    key = miniclip_key(TINY, 0)
    assert miniclip_key(dataclasses.replace(TINY, lr=1e-3), 0) != key
    assert miniclip_key(dataclasses.replace(TINY, styles=(("plain", 1.0),)), 0) != key
    assert miniclip_key(TINY, 1) != key
    assert miniclip_key(MiniCLIPRecipe(**dataclasses.asdict(TINY)), 0) == key


def test_changed_recipe_pretrains_new_entry(tiny_backbone, tiny_cache, caplog):
    changed = dataclasses.replace(TINY, lr=1e-3)
    with caplog.at_level(logging.INFO, logger="capt_lib.backbones.miniclip"):
        other = load_miniclip(changed, seed=0, cache_dir=tiny_cache)
    assert "pretraining MiniCLIP" in caplog.text
    assert other.key != tiny_backbone.key
    assert (tiny_cache / "miniclip" / other.key / "miniclip.json").is_file()
    assert not state_dicts_equal(other.model, tiny_backbone.model)


def test_corrupt_cache_is_pretrained_again(tmp_path, caplog):
    first = load_miniclip(TINY, seed=0, cache_dir=tmp_path)
    weights = tmp_path / "miniclip" / first.key / "model.safetensors"
    weights.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="capt_lib.backbones.miniclip"):
        again = load_miniclip(TINY, seed=0, cache_dir=tmp_path)
    assert "unusable" in caplog.text
    assert state_dicts_equal(again.model, first.model)


def test_named_recipe_tag():
    assert miniclip.recipe_name(RECIPES["smoke"]) == "smoke"
    assert miniclip.recipe_name(TINY) == "custom"


def test_invalid_recipes_raise():
    with pytest.raises(ValueError, match=r"'huge' is unknown; choose one of \['default', 'smoke'"):
        load_miniclip("huge")
    with pytest.raises(ValueError, match="num_images=60000 must lie in 1..50000"):
        MiniCLIPRecipe(num_images=60_000)
    with pytest.raises(ValueError, match="sum to 1"):
        MiniCLIPRecipe(styles=(("plain", 0.5),))
    with pytest.raises(ValueError, match=r"style_word_prob=1.5 must lie in \[0, 1\]"):
        MiniCLIPRecipe(style_word_prob=1.5)
    with pytest.raises(ValueError, match="unknown styles"):
        MiniCLIPRecipe(styles=(("sepia", 1.0),))


@pytest.mark.parametrize("style_word_prob", [0.0, 1.0])
def test_style_word_prob_controls_caption_style(style_word_prob):
    tokenizer = build_tokenizer(TINY)
    table = miniclip._caption_table(tokenizer)
    recipe = dataclasses.replace(TINY, style_word_prob=style_word_prob, attribute_caption_prob=0.0)
    labels = np.array([4] * 50 + [5] * 50)
    rows = miniclip._sample_captions(table, ["negative"] * 100, labels, recipe, np.random.default_rng(0))

    captions = [tokenizer.decode(table.tokens[row].tolist()) for row in rows]
    assert all(("negative" in c) == (style_word_prob == 1.0) for c in captions)
    assert all("coat" in c for c in captions[:50])
    assert all("sandal" in c for c in captions[50:])
    assert not any("with" in c or "which" in c for c in captions)
