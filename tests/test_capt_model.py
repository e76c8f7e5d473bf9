"""Tests of the assembled CAPT model and its stage-2 trainer on a tiny random CLIP."""

import dataclasses

import open_clip
import pytest
import torch
import torch.nn.functional as F

from capt_lib.backbones.base import Backbone
from capt_lib.confusion.bank import build_confusion_bank
from capt_lib.confusion.sample_miner import SAMConfig
from capt_lib.modules.adapter import DiffMannerAdapterConfig
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.modules.mgde import MGDEConfig
from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors, predict_logits, train_capt

NUM_CLASSES = 4


def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=16, patch_size=4, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
    )
    model.eval().requires_grad_(False)
    return Backbone(
        model=model,
        tokenizer=None,
        preprocess=None,
        name="tiny",
        pretrained=None,
        key="tiny",
        image_size=16,
        context_length=8,
        random_weights=True,
    )


def split_tensors(backbone, n, seed, with_images=False):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    with torch.no_grad():
        tokens = backbone.visual_tokens(images)
        features = F.normalize(backbone.visual_head(tokens), dim=-1)
    labels = torch.arange(n) % NUM_CLASSES
    return SplitTensors(
        features=features,
        labels=labels,
        sample_ids=torch.arange(n) + 1000 * seed,
        tokens=tokens,
        images=images if with_images else None,
    )


def random_pair_features(seed=0):
    generator = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(NUM_CLASSES, NUM_CLASSES, 16, generator=generator), dim=-1)
    common = (common + common.transpose(0, 1)) / 2  # commonality is symmetric in the pair
    difference = F.normalize(torch.randn(NUM_CLASSES, NUM_CLASSES, 16, generator=generator), dim=-1)
    return F.normalize(common, dim=-1), difference


def make_model(backbone, train, config=CAPTConfig(), seed=0):
    text = F.normalize(torch.randn(NUM_CLASSES, 16, generator=torch.Generator().manual_seed(seed + 7)), dim=-1)
    logits = backbone.model.logit_scale.exp() * train.features @ text.T
    bank = build_confusion_bank(
        logits, train.labels, train.features, train.sample_ids, tuple(f"c{i}" for i in range(NUM_CLASSES))
    )
    common, difference = random_pair_features(seed)
    torch.manual_seed(seed)
    return CAPTModel(backbone, text, bank, common, difference, config), text


SMALL = CAPTConfig(
    adapter=DiffMannerAdapterConfig(heads=2),
    mgde=MGDEConfig(n_semantic_experts=2, n_sample_experts=1, n_centres=2),
)


def test_untrained_capt_equals_base_model():
    backbone = tiny_backbone()
    train = split_tensors(backbone, 16, seed=1)
    model, text = make_model(backbone, train, SMALL)

    output = model(train.features, tokens=train.tokens)
    base_logits = backbone.model.logit_scale.exp() * train.features @ text.T

    torch.testing.assert_close(output.logits, base_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(output.pseudo_labels, base_logits.argmax(dim=1))


def test_in_block_placement_equals_base_at_init():
    backbone = tiny_backbone()
    train = split_tensors(backbone, 8, seed=1, with_images=True)
    config = dataclasses.replace(SMALL, adapter=DiffMannerAdapterConfig(heads=2, placement="in_blocks", blocks=(0,)))
    model, text = make_model(backbone, train, config)

    with torch.no_grad():
        output = model(train.features, images=train.images)
    base_logits = backbone.model.logit_scale.exp() * train.features @ text.T
    model.adapter_hooks.remove()

    torch.testing.assert_close(output.logits, base_logits, atol=1e-4, rtol=1e-4)


def test_trainable_get_gradients_frozen_do_not():
    backbone = tiny_backbone()
    train = split_tensors(backbone, 16, seed=1)
    # Top-3 routing over the 3 experts, so no expert is skipped by the router in this batch.
    dense = dataclasses.replace(SMALL, mgde=dataclasses.replace(SMALL.mgde, top_k=3))
    model, _ = make_model(backbone, train, dense)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)

    # Zero-initialised residual layers pass no gradient to the layers before them on the
    # first step, so two steps are taken before every trainable weight is checked.
    for _ in range(2):
        optimizer.zero_grad()
        output = model(train.features, tokens=train.tokens)
        F.cross_entropy(output.logits, train.labels).backward()
        optimizer.step()

    trainable = dict(model.named_parameters())
    missing = [name for name, p in trainable.items() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    frozen_with_grad = [name for name, p in backbone.model.named_parameters() if p.grad is not None]
    assert frozen_with_grad == []
    assert all(not p.requires_grad for p in backbone.model.parameters())


def test_training_improves_train_fit():
    backbone = tiny_backbone()
    train = split_tensors(backbone, 32, seed=1)
    model, _ = make_model(backbone, train, SMALL)
    before = (predict_logits(model, train).argmax(1) == train.labels).float().mean().item()

    # Validating on the training images keeps the best fit of the training split.
    train_capt(model, train, train, CAPTTrainConfig(epochs=15, batch_size=8, lr=1e-2, seed=1))
    after = (predict_logits(model, train).argmax(1) == train.labels).float().mean().item()

    assert after > before + 0.2


def test_resume_after_kill_gives_identical_numbers(tmp_path):
    backbone = tiny_backbone()
    train = split_tensors(backbone, 24, seed=1)
    val = split_tensors(backbone, 12, seed=2)
    config = CAPTTrainConfig(epochs=4, batch_size=8, lr=5e-3, seed=3)
    random_sam = dataclasses.replace(SMALL, sam=SAMConfig(mode="random", seed=5))

    straight, _ = make_model(backbone, train, random_sam)
    result_straight = train_capt(straight, train, val, config, checkpoint_dir=tmp_path / "straight")

    resumed, _ = make_model(backbone, train, random_sam)
    train_capt(resumed, train, val, config, checkpoint_dir=tmp_path / "killed", stop_after_epoch=2)
    fresh, _ = make_model(backbone, train, random_sam)  # a new process after the kill
    result_resumed = train_capt(fresh, train, val, config, checkpoint_dir=tmp_path / "killed")

    assert result_resumed.history == result_straight.history
    assert result_resumed.best_epoch == result_straight.best_epoch
    torch.testing.assert_close(predict_logits(fresh, val), predict_logits(straight, val), atol=0, rtol=0)


def test_resume_with_other_settings_is_rejected(tmp_path):
    backbone = tiny_backbone()
    train = split_tensors(backbone, 16, seed=1)
    model, _ = make_model(backbone, train, SMALL)
    train_capt(model, train, train, CAPTTrainConfig(epochs=1, batch_size=8), checkpoint_dir=tmp_path)

    with pytest.raises(ValueError, match="other settings"):
        train_capt(model, train, train, CAPTTrainConfig(epochs=2, batch_size=8), checkpoint_dir=tmp_path)


def test_model_selection_keeps_best_validation_epoch():
    backbone = tiny_backbone()
    train = split_tensors(backbone, 16, seed=1)
    val = split_tensors(backbone, 16, seed=2)
    model, _ = make_model(backbone, train, SMALL)

    result = train_capt(model, train, val, CAPTTrainConfig(epochs=5, batch_size=8, lr=1e-2))
    best_row = max(result.history, key=lambda row: row["val_accuracy"])
    final_val = (predict_logits(model, val).argmax(1) == val.labels).float().mean().item() * 100

    assert result.best_val_accuracy == best_row["val_accuracy"]
    assert final_val == pytest.approx(result.best_val_accuracy)


def test_bank_with_other_class_count_is_rejected():
    backbone = tiny_backbone()
    train = split_tensors(backbone, 16, seed=1)
    _, text = make_model(backbone, train, SMALL)
    logits = torch.randn(16, NUM_CLASSES + 1)
    bank = build_confusion_bank(
        logits, train.labels, train.features, train.sample_ids, tuple(f"c{i}" for i in range(NUM_CLASSES + 1))
    )
    common, difference = random_pair_features()

    with pytest.raises(ValueError, match="same label space"):
        CAPTModel(backbone, text, bank, common, difference, SMALL)
