"""Tests of the CAPT losses: symmetric InfoNCE by hand and by a slow loop, and the total loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from capt_lib.training.losses import capt_loss, symmetric_info_nce


def info_nce_loop(image_features, labels, class_text_features, temperature):
    """Slow symmetric InfoNCE in Python floats, one image and one class at a time."""
    images = [F.normalize(f, dim=0).tolist() for f in image_features]
    texts = {c: F.normalize(class_text_features[c], dim=0).tolist() for c in sorted(set(labels.tolist()))}
    labels = labels.tolist()

    def logit(image, c):
        return sum(x * y for x, y in zip(image, texts[c])) / temperature

    image_terms = []
    for image, label in zip(images, labels):
        denominator = sum(math.exp(logit(image, c)) for c in texts)
        image_terms.append(-math.log(math.exp(logit(image, label)) / denominator))

    class_terms = []
    for c in texts:
        denominator = sum(math.exp(logit(image, c)) for image in images)
        members = [image for image, label in zip(images, labels) if label == c]
        class_terms.append(-sum(math.log(math.exp(logit(image, c)) / denominator) for image in members) / len(members))

    return (sum(image_terms) / len(image_terms) + sum(class_terms) / len(class_terms)) / 2


def test_two_images_two_classes_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: (1, 0) and (0, 1)
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1])

    loss = symmetric_info_nce(images, labels, texts, temperature=0.5)

    # logits = cos / 0.5: image 0 -> (2.0, 1.2), image 1 -> (0.0, 1.6)
    image_to_text = (math.log(1 + math.exp(1.2 - 2.0)) + math.log(1 + math.exp(0.0 - 1.6))) / 2
    # class 0 over images (2.0, 0.0) targets image 0, class 1 over (1.2, 1.6) targets image 1
    text_to_image = (math.log(1 + math.exp(0.0 - 2.0)) + math.log(1 + math.exp(1.2 - 1.6))) / 2
    expected = (image_to_text + text_to_image) / 2
    assert expected == pytest.approx(0.29874, abs=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_multi_positive_matches_loop():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(7, 5, generator=generator)
    texts = torch.randn(6, 5, generator=generator)
    labels = torch.tensor([4, 1, 4, 4, 0, 1, 2])  # classes 3 and 5 absent, 4 three times

    loss = symmetric_info_nce(images, labels, texts, temperature=0.1)

    assert float(loss) == pytest.approx(info_nce_loop(images, labels, texts, 0.1), rel=1e-5)


def test_absent_classes_do_not_matter():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, generator=generator)
    texts = torch.randn(5, 3, generator=generator)
    labels = torch.tensor([0, 2, 2, 4])
    changed = texts.clone()
    changed[[1, 3]] = torch.randn(2, 3, generator=generator)

    assert torch.equal(
        symmetric_info_nce(images, labels, texts, 0.07),
        symmetric_info_nce(images, labels, changed, 0.07),
    )


def test_single_class_image_to_text_is_zero():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0]])
    labels = torch.tensor([0, 0])

    loss = symmetric_info_nce(images, labels, texts, temperature=1.0)

    # image -> text has a single class and is 0. text -> image has logits (1, 0) and a uniform target.
    text_to_image = -(0.5 * (1 - math.log(math.e + 1)) + 0.5 * (0 - math.log(math.e + 1)))
    assert float(loss) == pytest.approx(text_to_image / 2, rel=1e-6)


def test_gradient_is_finite():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(6, 4, generator=generator, requires_grad=True)
    texts = torch.randn(3, 4, generator=generator)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])

    temperature = torch.tensor(0.01, requires_grad=True)

    symmetric_info_nce(images, labels, texts, temperature).backward()

    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert torch.isfinite(temperature.grad)


def make_batch():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2])
    features = torch.randn(6, 5, generator=generator, requires_grad=True)
    feature_labels = torch.tensor([0, 2, 1, 2, 1, 0])
    texts = torch.randn(3, 5, generator=generator)
    return logits, labels, features, feature_labels, texts


def test_capt_loss_lambda_zero_is_cross_entropy():
    logits, labels, features, feature_labels, texts = make_batch()

    total, parts = capt_loss(logits, labels, features, feature_labels, texts, lam=0.0, temperature=0.07)

    assert torch.equal(total, F.cross_entropy(logits, labels))
    assert torch.equal(parts["L_ori"], F.cross_entropy(logits, labels).detach())


def test_capt_loss_combines_parts():
    logits, labels, features, feature_labels, texts = make_batch()

    total, parts = capt_loss(logits, labels, features, feature_labels, texts, lam=0.5, temperature=0.07)
    total.backward()

    loss_ori = F.cross_entropy(logits, labels)
    loss_confuse = symmetric_info_nce(features, feature_labels, texts, 0.07)
    assert parts["L_confuse"].item() == pytest.approx(loss_confuse.item(), rel=1e-6)
    assert total.item() == pytest.approx((loss_ori + 0.5 * loss_confuse).item(), rel=1e-6)
    assert not parts["L_ori"].requires_grad
    assert torch.isfinite(logits.grad).all()
    assert features.grad.abs().sum() > 0


def test_invalid_inputs_raise():
    logits, labels, features, feature_labels, texts = make_batch()

    with pytest.raises(ValueError, match="lam=-1"):
        capt_loss(logits, labels, features, feature_labels, texts, lam=-1, temperature=0.07)
    with pytest.raises(ValueError, match="temperature=0.0"):
        symmetric_info_nce(features, feature_labels, texts, 0.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        symmetric_info_nce(features, torch.tensor([0, 1, 2, 3, 0, 0]), texts, 0.07)
    with pytest.raises(ValueError, match="same classes"):
        capt_loss(logits, labels, features, feature_labels, texts[:2], lam=1.0, temperature=0.07)
