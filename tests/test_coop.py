"""Tests of CoOp: the prompt learner, the CoOp model and its trainer on cached features."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from capt_lib.backbones.base import Backbone
from capt_lib.prompts.coop import CoOpModel, PromptLearner
from capt_lib.prompts.zero_shot import build_text_classifier
from capt_lib.training.coop_trainer import CoOpConfig, epoch_learning_rate, evaluate_accuracy, train_coop

CONTEXT_LENGTH = 16
EMBED_DIM = 24
WIDTH = 32
CLASSNAMES = ["coat", "ankle_boot", "shirt", "bag"]
WORDS = ["a", "photo", "of", "the", "x", ".", "coat", "ankle", "boot", "shirt", "bag", "very", "long", "name"]


class WordTokenizer:
    """Whitespace tokenizer over a fixed word list, unlike open_clip's in every id.

    Padding is 0, words are 2.., and the start and end tokens come last. With
    ``end_is_highest=False`` the end token is 1, so only ``pool_type="eos"`` finds it.
    """

    def __init__(self, end_is_highest=True):
        self.word_ids = {word: i + 2 for i, word in enumerate(WORDS)}
        self.sot_id = len(WORDS) + 2
        self.eot_id = len(WORDS) + 3 if end_is_highest else 1
        self.vocab_size = len(WORDS) + 4

    def __call__(self, texts):
        ids = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
        for row, text in enumerate(texts):
            words = text.lower().replace(".", " . ").split()
            tokens = [self.sot_id] + [self.word_ids[word] for word in words] + [self.eot_id]
            if len(tokens) > CONTEXT_LENGTH:
                raise ValueError(f"text {text!r} has {len(tokens)} tokens, more than {CONTEXT_LENGTH}")
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


def make_backbone(tokenizer_kind: str) -> Backbone:
    if tokenizer_kind == "open_clip_bpe":
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
        text_cfg = dict(vocab_size=49408)
    elif tokenizer_kind == "word":
        tokenizer = WordTokenizer()
        text_cfg = dict(vocab_size=tokenizer.vocab_size)
    else:
        tokenizer = WordTokenizer(end_is_highest=False)
        text_cfg = dict(vocab_size=tokenizer.vocab_size, pool_type="eos", eos_id=tokenizer.eot_id)

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=EMBED_DIM,
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=CONTEXT_LENGTH, width=WIDTH, heads=2, layers=1, **text_cfg),
    )
    return Backbone(
        model=model.eval().requires_grad_(False),
        tokenizer=tokenizer,
        preprocess=None,
        name="tiny-test-clip",
        pretrained=None,
        key=f"tiny-test-clip-{tokenizer_kind}",
        image_size=28,
        context_length=CONTEXT_LENGTH,
        random_weights=True,
    )


TOKENIZER_KINDS = ["open_clip_bpe", "word", "word_eos_pooling"]


@pytest.fixture(scope="module", params=TOKENIZER_KINDS)
def any_backbone(request) -> Backbone:
    return make_backbone(request.param)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return make_backbone("open_clip_bpe")


@pytest.fixture
def one_thread():
    """Run on one thread: tiny backward passes are far slower with two threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- PromptLearner ---------------------------------------------------------------------


def test_ctx_init_reproduces_hand_written_prompt(any_backbone):
    learner = PromptLearner(any_backbone, CLASSNAMES, ctx_init="a photo of a")

    with torch.no_grad():
        actual = CoOpModel(any_backbone, learner).text_features()
    expected = any_backbone.encode_text([f"a photo of a {name.replace('_', ' ')}." for name in CLASSNAMES])

    assert learner.n_ctx == 4
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_ctx_init_sets_n_ctx_from_its_tokens(backbone):
    learner = PromptLearner(backbone, CLASSNAMES, n_ctx=8, ctx_init="a photo")

    assert learner.n_ctx == 2
    assert learner.ctx.shape == (2, WIDTH)


def test_buffer_shapes(any_backbone):
    learner = PromptLearner(any_backbone, CLASSNAMES, n_ctx=3)

    assert learner.ctx.shape == (3, WIDTH)
    assert learner.token_prefix.shape == (4, 1, WIDTH)
    assert learner.token_suffix.shape == (4, CONTEXT_LENGTH - 1 - 3, WIDTH)
    assert learner.tokenized_prompts.shape == (4, CONTEXT_LENGTH)
    assert learner().shape == (4, CONTEXT_LENGTH, WIDTH)


def test_prompts_are_placeholder_prompts_with_ctx(any_backbone):
    learner = PromptLearner(any_backbone, CLASSNAMES, n_ctx=4, seed=3)
    ids = any_backbone.tokenizer([f"X X X X {name.replace('_', ' ')}." for name in CLASSNAMES])

    with torch.no_grad():
        expected = any_backbone.model.token_embedding(ids)
    expected[:, 1:5, :] = learner.ctx.detach()

    assert torch.equal(learner.tokenized_prompts, ids)
    torch.testing.assert_close(learner(), expected, atol=0, rtol=0)


def test_prefix_is_start_token_embedding(any_backbone):
    learner = PromptLearner(any_backbone, CLASSNAMES)
    tokenizer = any_backbone.tokenizer
    sot_id = tokenizer.sot_token_id if hasattr(tokenizer, "sot_token_id") else tokenizer.sot_id

    expected = any_backbone.model.token_embedding.weight[sot_id]

    for c in range(len(CLASSNAMES)):
        assert torch.equal(learner.token_prefix[c, 0], expected)


def test_random_ctx_is_seeded(backbone):
    first = PromptLearner(backbone, CLASSNAMES, seed=5).ctx
    again = PromptLearner(backbone, CLASSNAMES, seed=5).ctx
    other = PromptLearner(backbone, CLASSNAMES, seed=6).ctx

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert 0.015 < float(first.detach().std()) < 0.025  # 128 draws of N(0, 0.02^2)


def test_class_specific_context(backbone):
    learner = PromptLearner(backbone, CLASSNAMES, n_ctx=2, csc=True)
    before = learner().detach().clone()

    with torch.no_grad():
        learner.ctx[1].add_(1.0)
    after = learner()

    assert learner.ctx.shape == (len(CLASSNAMES), 2, WIDTH)
    assert not torch.equal(learner.ctx[0], learner.ctx[2])
    assert torch.equal(after[:, 1:3], learner.ctx.detach())
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[1, 1:3], before[1, 1:3] + 1.0)


def test_class_specific_ctx_init(backbone):
    learner = PromptLearner(backbone, CLASSNAMES, ctx_init="a photo of a", csc=True)
    shared = PromptLearner(backbone, CLASSNAMES, ctx_init="a photo of a")

    assert learner.ctx.shape == (len(CLASSNAMES), 4, WIDTH)
    for c in range(len(CLASSNAMES)):
        assert torch.equal(learner.ctx[c], shared.ctx)


def test_state_dict_holds_only_ctx(backbone):
    learner = PromptLearner(backbone, CLASSNAMES)

    assert list(learner.state_dict()) == ["ctx"]


def test_too_long_class_name_raises(backbone):
    with pytest.raises(ValueError, match="very long name"):
        PromptLearner(backbone, ["coat", " ".join(["very long name"] * 4)], n_ctx=4)


def test_class_name_fits_exactly(backbone):
    # SOT + 4 ctx + 9 name tokens + "." + EOT = 16 tokens, the whole context.
    name = "very long name very long name very long name"
    learner = PromptLearner(backbone, [name], n_ctx=4)

    assert int(learner.tokenized_prompts[0].argmax()) == CONTEXT_LENGTH - 1


def test_unsupported_class_token_position_raises(backbone):
    with pytest.raises(ValueError, match=r"class_token_position='middle'.*\['end'\]"):
        PromptLearner(backbone, CLASSNAMES, class_token_position="middle")


def test_tokenizer_without_start_token_raises(backbone):
    def no_start_token(texts):
        return backbone.tokenizer(texts)[:, 1:]

    bad = Backbone(**{**backbone.__dict__, "tokenizer": no_start_token})

    with pytest.raises(ValueError, match="start token"):
        PromptLearner(bad, CLASSNAMES)


def test_empty_ctx_init_raises(backbone):
    with pytest.raises(ValueError, match="ctx_init"):
        PromptLearner(backbone, CLASSNAMES, ctx_init="  ")


# --- CoOpModel -------------------------------------------------------------------------


def test_trainable_parameters_are_only_ctx(backbone):
    learner = PromptLearner(backbone, CLASSNAMES)
    model = CoOpModel(backbone, learner)

    trainable = model.trainable_parameters()

    assert len(trainable) == 1
    assert trainable[0] is learner.ctx


def test_gradients_reach_only_ctx(backbone):
    model = CoOpModel(backbone, PromptLearner(backbone, CLASSNAMES))
    features = torch.randn(6, EMBED_DIM, generator=torch.Generator().manual_seed(0))

    F.cross_entropy(model.logits(features), torch.tensor([0, 1, 2, 3, 0, 1])).backward()

    assert model.prompt_learner.ctx.grad is not None
    assert model.prompt_learner.ctx.grad.abs().sum() > 0
    frozen_with_grad = [name for name, p in backbone.model.named_parameters() if p.grad is not None]
    assert frozen_with_grad == []


def test_logits_formula(backbone):
    model = CoOpModel(backbone, PromptLearner(backbone, CLASSNAMES, seed=1))
    features = torch.randn(5, EMBED_DIM, generator=torch.Generator().manual_seed(0)) * 4.0

    with torch.no_grad():
        text = model.text_features()
        expected = backbone.model.logit_scale.exp() * (features / features.norm(dim=-1, keepdim=True)) @ text.T
        actual = model.logits(features)

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(CLASSNAMES)), atol=1e-6, rtol=0)


def test_text_encoder_stays_in_eval_mode(backbone):
    model = CoOpModel(backbone, PromptLearner(backbone, CLASSNAMES)).train()

    assert model.training
    assert not model.text_encoder.training
    assert not backbone.model.transformer.training


def test_unfrozen_backbone_raises(backbone):
    unfrozen = make_backbone("open_clip_bpe")
    unfrozen.model.ln_final.weight.requires_grad_(True)

    with pytest.raises(ValueError, match="ln_final.weight"):
        CoOpModel(unfrozen, PromptLearner(unfrozen, CLASSNAMES))


# --- training --------------------------------------------------------------------------


def teacher_problem(backbone, n_per_class=8, noise=0.02):
    """Image features labelled by a CoOp teacher whose context is far from "a photo of a".

    A shared context can fit these labels exactly (the teacher's does), while the
    hand-written prompt classifies half of them wrongly.
    """
    teacher = PromptLearner(backbone, CLASSNAMES, n_ctx=4)
    with torch.no_grad():
        teacher.ctx.copy_(torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(100)))
        targets = CoOpModel(backbone, teacher).text_features()  # (C, E)

    labels = torch.arange(len(CLASSNAMES)).repeat_interleave(n_per_class)
    noise = noise * torch.randn(len(labels), EMBED_DIM, generator=torch.Generator().manual_seed(0))
    return F.normalize(targets[labels] + noise, dim=-1), labels


def zero_shot_accuracy(backbone, features, labels):
    weights = build_text_classifier(backbone, CLASSNAMES, ["a photo of a {}."])
    return float(((features @ weights.T).argmax(dim=-1) == labels).float().mean())


def test_training_fixes_wrong_zero_shot(backbone, one_thread):
    features, labels = teacher_problem(backbone)
    cfg = CoOpConfig(epochs=30, batch_size=8, lr=0.002, ctx_init="a photo of a")

    model, history = train_coop(backbone, features, labels, CLASSNAMES, cfg)

    assert zero_shot_accuracy(backbone, features, labels) <= 0.5
    assert evaluate_accuracy(model, features, labels) >= 0.9
    assert len(history) == 30
    assert history[-1]["loss"] < history[0]["loss"]


def test_training_with_adamw_and_random_ctx(backbone, one_thread):
    features, labels = teacher_problem(backbone)
    cfg = CoOpConfig(epochs=30, batch_size=8, optimizer="adamw", lr=0.002, ctx_init=None)

    model, _ = train_coop(backbone, features, labels, CLASSNAMES, cfg)

    assert evaluate_accuracy(model, features, labels) >= 0.9


def test_training_is_deterministic(backbone, one_thread):
    features, labels = teacher_problem(backbone)
    cfg = CoOpConfig(epochs=4, batch_size=8, ctx_init=None, seed=7)

    first, first_history = train_coop(backbone, features, labels, CLASSNAMES, cfg)
    second, second_history = train_coop(backbone, features, labels, CLASSNAMES, cfg)

    assert torch.equal(first.prompt_learner.ctx, second.prompt_learner.ctx)
    assert first_history == second_history


def test_training_leaves_backbone_unchanged(backbone, one_thread):
    features, labels = teacher_problem(backbone)
    before = {name: p.clone() for name, p in backbone.model.state_dict().items()}

    train_coop(backbone, features, labels, CLASSNAMES, CoOpConfig(epochs=2, batch_size=8))

    after = backbone.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_validation_keeps_best_epoch(backbone, one_thread):
    features, labels = teacher_problem(backbone)
    # Validation labels follow the hand-written prompts, so training on the teacher's
    # labels lowers validation accuracy and an early epoch is the best one.
    val_labels = (features @ build_text_classifier(backbone, CLASSNAMES, ["a photo of a {}."]).T).argmax(dim=-1)
    cfg = CoOpConfig(epochs=30, batch_size=8, final_model="best_val")

    model, history = train_coop(
        backbone, features, labels, CLASSNAMES, cfg, val_features=features, val_labels=val_labels
    )

    val_accuracies = [record["val_accuracy"] for record in history]
    assert max(val_accuracies) > val_accuracies[-1]
    assert evaluate_accuracy(model, features, val_labels) == max(val_accuracies)


def test_last_step_keeps_the_final_epoch_despite_validation(backbone, one_thread):
    features, labels = teacher_problem(backbone)
    val_labels = (features @ build_text_classifier(backbone, CLASSNAMES, ["a photo of a {}."]).T).argmax(dim=-1)
    cfg = CoOpConfig(epochs=30, batch_size=8)  # final_model="last_step" by default

    model, history = train_coop(
        backbone, features, labels, CLASSNAMES, cfg, val_features=features, val_labels=val_labels
    )

    val_accuracies = [record["val_accuracy"] for record in history]
    assert max(val_accuracies) > val_accuracies[-1]
    assert evaluate_accuracy(model, features, val_labels) == val_accuracies[-1]


def test_best_val_without_validation_data_is_an_error(backbone):
    features, labels = teacher_problem(backbone, n_per_class=2)

    with pytest.raises(ValueError, match="best_val"):
        train_coop(backbone, features, labels, CLASSNAMES, CoOpConfig(epochs=2, final_model="best_val"))


def test_unknown_final_model_is_an_error():
    with pytest.raises(ValueError, match="final_model"):
        CoOpConfig(final_model="best")


def test_learning_rate_schedule():
    cfg = CoOpConfig(epochs=5, warmup_epochs=1, lr=0.1, warmup_lr=0.01)

    assert epoch_learning_rate(cfg, 0) == 0.01
    assert epoch_learning_rate(cfg, 1) == pytest.approx(0.1)
    assert epoch_learning_rate(cfg, 3) == pytest.approx(0.05)
    assert epoch_learning_rate(cfg, 4) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.75)))


def test_history_records_the_schedule(backbone, one_thread):
    features, labels = teacher_problem(backbone, n_per_class=2)
    cfg = CoOpConfig(epochs=3, batch_size=8, warmup_epochs=1, lr=0.01, warmup_lr=0.001)

    _, history = train_coop(backbone, features, labels, CLASSNAMES, cfg)

    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert [record["lr"] for record in history] == pytest.approx([0.001, 0.01, 0.005])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optimizer", "adam", r"\['sgd', 'adamw'\]"),
        ("class_token_position", "front", r"\['end'\]"),
        ("epochs", 0, "epochs=0"),
        ("warmup_epochs", 5, "warmup_epochs=5"),
        ("lr", 0.0, "lr=0.0"),
    ],
)
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        CoOpConfig(**{"epochs": 5, field: value})


def test_train_rejects_out_of_range_labels(backbone):
    features = torch.randn(3, EMBED_DIM)

    with pytest.raises(ValueError, match=r"train_labels lie in \[0, 4\]"):
        train_coop(backbone, features, torch.tensor([0, 1, 4]), CLASSNAMES, CoOpConfig(epochs=1, warmup_epochs=0))


def test_train_rejects_wrong_feature_width(backbone):
    with pytest.raises(ValueError, match=r"expected \(N, 24\)"):
        train_coop(backbone, torch.randn(3, 23), torch.tensor([0, 1, 2]), CLASSNAMES, CoOpConfig(epochs=2))


def test_train_rejects_half_of_val_data(backbone):
    features, labels = torch.randn(3, EMBED_DIM), torch.tensor([0, 1, 2])

    with pytest.raises(ValueError, match="both val_features and val_labels"):
        train_coop(backbone, features, labels, CLASSNAMES, CoOpConfig(epochs=2), val_features=features)
