"""Tests of the prompt-fed text path against open_clip's own encode_text."""

import open_clip
import pytest
import torch
from torch import nn

from capt_lib.prompts.text_encoder import TextEncoder

VOCAB_SIZE = 1000
CONTEXT_LENGTH = 16
EOT_ID = VOCAB_SIZE - 1  # the highest id, as CLIP's argmax pooling expects
SOT_ID = VOCAB_SIZE - 2
EOS_ID = 3  # an end token that is not the highest id, for pool_type="eos"
FIRST_WORD_ID = 10  # random words use ids from here up to SOT_ID, so they never equal EOS_ID


def tiny_clip(**text_overrides) -> nn.Module:
    torch.manual_seed(0)
    text_cfg = dict(context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=32, heads=2, layers=2)
    text_cfg.update(text_overrides)
    model = open_clip.model.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16),
        text_cfg=text_cfg,
    )
    # Weights larger than open_clip's initialisation, so that every position and every
    # output dimension visibly changes the result.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval().requires_grad_(False)


def random_token_ids(lengths, seed=0, end_id=EOT_ID) -> torch.Tensor:
    """Rows of [SOT, words..., end_id, padding] with the given numbers of words."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), CONTEXT_LENGTH, dtype=torch.long)
    for row, n_words in enumerate(lengths):
        ids[row, 0] = SOT_ID
        ids[row, 1 : 1 + n_words] = torch.randint(FIRST_WORD_ID, SOT_ID, (n_words,), generator=generator)
        ids[row, 1 + n_words] = end_id
    return ids


@pytest.mark.parametrize(
    "text_overrides",
    [
        {},
        {"pool_type": "eos", "eos_id": EOS_ID},
        {"pool_type": "last"},
        {"pool_type": "first"},
        {"proj_bias": True},
        {"proj_type": "none", "width": 24, "heads": 2},
        {"no_causal_mask": True},
    ],
    ids=["argmax", "eos", "last", "first", "linear_projection", "no_projection", "no_causal_mask"],
)
def test_forward_matches_encode_text(text_overrides):
    model = tiny_clip(**text_overrides)
    end_id = text_overrides.get("eos_id", EOT_ID)
    ids = random_token_ids([0, 3, 7, CONTEXT_LENGTH - 2], end_id=end_id)

    expected = model.encode_text(ids)
    actual = TextEncoder(model)(model.token_embedding(ids), ids)

    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_linear_projection_is_used():
    model = tiny_clip(proj_bias=True)

    assert isinstance(model.text_projection, nn.Linear)
    assert TextEncoder(model).text_projection is model.text_projection


def test_gradient_matches_encode_text():
    model = tiny_clip()
    ids = random_token_ids([2, 5, 9])
    output_weights = torch.randn(3, 24, generator=torch.Generator().manual_seed(1))

    captured = []

    def make_embeddings_a_leaf(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = model.token_embedding.register_forward_hook(make_embeddings_a_leaf)
    (model.encode_text(ids) * output_weights).sum().backward()
    handle.remove()
    expected = captured[0].grad

    embeddings = model.token_embedding(ids).detach().requires_grad_(True)
    (TextEncoder(model)(embeddings, ids) * output_weights).sum().backward()

    assert expected is not None and expected.abs().sum() > 0
    torch.testing.assert_close(embeddings.grad, expected, atol=1e-5, rtol=0)


def test_frozen_weights_get_no_gradient():
    model = tiny_clip()
    ids = random_token_ids([4])
    embeddings = model.token_embedding(ids).detach().requires_grad_(True)

    TextEncoder(model)(embeddings, ids).sum().backward()

    assert embeddings.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_encoder_shares_the_model_weights():
    model = tiny_clip()
    encoder = TextEncoder(model)

    assert encoder.transformer is model.transformer
    assert encoder.positional_embedding is model.positional_embedding
    assert encoder.embed_tokens(random_token_ids([1])).shape == (1, CONTEXT_LENGTH, 32)


def test_real_tokenizer_and_vit_b32_tower():
    cfg = open_clip.get_model_config("ViT-B-32")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16),
        text_cfg=cfg["text_cfg"],
    ).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ids = tokenizer(["a photo of a ankle boot.", "a blurred photo of a t-shirt/top.", ""])

    with torch.no_grad():
        expected = model.encode_text(ids)
        actual = TextEncoder(model)(model.token_embedding(ids), ids)

    assert actual.shape == (3, cfg["embed_dim"])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_wrong_embedding_shape_raises():
    model = tiny_clip()
    encoder = TextEncoder(model)
    ids = random_token_ids([1, 2])

    with pytest.raises(ValueError, match=r"expected \(N, 16, 32\)"):
        encoder(torch.zeros(2, CONTEXT_LENGTH - 1, 32), ids)
    with pytest.raises(ValueError, match="tokenized_prompts has shape"):
        encoder(torch.zeros(2, CONTEXT_LENGTH, 32), ids[:1])


def test_model_without_text_tower_raises():
    with pytest.raises(ValueError, match="token_embedding"):
        TextEncoder(nn.Linear(2, 2))


def test_unpooled_text_raises():
    model = tiny_clip()
    model.text_pool_type = "none"

    with pytest.raises(ValueError, match="argmax"):
        TextEncoder(model)
