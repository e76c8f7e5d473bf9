"""Tests of the template-built zero-shot classifier."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from capt_lib.backbones.base import Backbone
from capt_lib.prompts.templates import CUSTOM_TEMPLATES, fill_templates, format_classname, validate_templates
from capt_lib.prompts.zero_shot import ZeroShotClassifier, build_text_classifier

CONTEXT_LENGTH = 16
CLASSNAMES = ["coat", "ankle_boot", "shirt", "bag", "sandal"]
TEMPLATES = ["a photo of a {}.", "a blurred photo of the {}.", "{}, upside down."]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return Backbone(
        model=model.eval().requires_grad_(False),
        tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH),
        preprocess=None,
        name="tiny-test-clip",
        pretrained=None,
        key="tiny-test-clip",
        image_size=28,
        context_length=CONTEXT_LENGTH,
        random_weights=True,
    )


def encode_one(backbone, text):
    with torch.no_grad():
        return F.normalize(backbone.model.encode_text(backbone.tokenizer([text])), dim=-1)[0]


def test_single_template_matches_encode_text(backbone):
    weights = build_text_classifier(backbone, CLASSNAMES, ["a photo of a {}."])

    for c, name in enumerate(CLASSNAMES):
        expected = encode_one(backbone, "a photo of a " + name.replace("_", " ") + ".")
        torch.testing.assert_close(weights[c], expected, atol=1e-6, rtol=0)


def test_ensemble_matches_slow_loop(backbone):
    weights = build_text_classifier(backbone, CLASSNAMES, TEMPLATES)

    assert weights.shape == (len(CLASSNAMES), 24)
    for c, name in enumerate(CLASSNAMES):
        per_template = [encode_one(backbone, t.format(name.replace("_", " "))) for t in TEMPLATES]
        mean = torch.stack(per_template).mean(dim=0)
        torch.testing.assert_close(weights[c], mean / mean.norm(), atol=1e-6, rtol=0)


def test_templates_change_the_weights(backbone):
    single = build_text_classifier(backbone, CLASSNAMES, TEMPLATES[:1])
    ensemble = build_text_classifier(backbone, CLASSNAMES, TEMPLATES)

    assert (single - ensemble).abs().max() > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 7])
def test_chunking_does_not_change_weights(backbone, chunk_size):
    whole = build_text_classifier(backbone, CLASSNAMES, TEMPLATES, chunk_size=256)
    chunked = build_text_classifier(backbone, CLASSNAMES, TEMPLATES, chunk_size=chunk_size)

    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_classifier_logits_formula(backbone):
    classifier = ZeroShotClassifier(backbone, CLASSNAMES, TEMPLATES)
    image_features = torch.randn(6, 24, generator=torch.Generator().manual_seed(0)) * 3.0

    unit = image_features / image_features.norm(dim=-1, keepdim=True)
    expected = backbone.model.logit_scale.exp() * unit @ build_text_classifier(backbone, CLASSNAMES, TEMPLATES).T

    assert classifier.num_classes == len(CLASSNAMES)
    torch.testing.assert_close(classifier.logits(image_features), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(classifier(image_features), expected, atol=1e-5, rtol=0)


def test_classifier_predicts_its_own_text_features(backbone):
    classifier = ZeroShotClassifier(backbone, CLASSNAMES, TEMPLATES)

    predictions = classifier.logits(classifier.weights).argmax(dim=-1)

    assert predictions.tolist() == list(range(len(CLASSNAMES)))


def test_classifier_weights_move_with_module(backbone):
    classifier = ZeroShotClassifier(backbone, CLASSNAMES, TEMPLATES[:1]).to(torch.float64)

    assert classifier.weights.dtype == torch.float64
    assert classifier.logit_scale.dtype == torch.float64


def test_wrong_feature_width_raises(backbone):
    classifier = ZeroShotClassifier(backbone, CLASSNAMES, TEMPLATES[:1])

    with pytest.raises(ValueError, match=r"expected \(B, 24\)"):
        classifier.logits(torch.zeros(2, 23))


@pytest.mark.parametrize(
    "templates, message",
    [
        ("a photo of a {}.", "single string"),
        ([], "empty"),
        (["a photo of a cat."], "exactly one"),
        (["a {} or a {}."], "exactly one"),
        (["a {name}."], "exactly one"),
    ],
)
def test_invalid_templates_raise(backbone, templates, message):
    with pytest.raises(ValueError, match=message):
        build_text_classifier(backbone, CLASSNAMES, templates)


def test_invalid_chunk_size_raises(backbone):
    with pytest.raises(ValueError, match="chunk_size=0"):
        build_text_classifier(backbone, CLASSNAMES, TEMPLATES, chunk_size=0)


def test_empty_classnames_raise(backbone):
    with pytest.raises(ValueError, match="classnames is empty"):
        build_text_classifier(backbone, [], TEMPLATES)


def test_format_classname_replaces_underscores():
    assert format_classname("ankle_boot") == "ankle boot"
    assert format_classname("T-shirt/top") == "T-shirt/top"


def test_fill_templates_formats_the_name():
    assert fill_templates(["a photo of a {}.", "{} texture."], "ankle_boot") == [
        "a photo of a ankle boot.",
        "ankle boot texture.",
    ]


def test_custom_templates_are_valid():
    assert validate_templates(list(CUSTOM_TEMPLATES.values())) == tuple(CUSTOM_TEMPLATES.values())
    assert CUSTOM_TEMPLATES["EuroSAT"] == "a centered satellite photo of {}."
    assert CUSTOM_TEMPLATES["DescribableTextures"] == "{} texture."
