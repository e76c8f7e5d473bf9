"""Tests of precision as a setting: resolution per device, and training under bf16 autocast on CPU.

CUDA runs use fp16 or bf16 autocast. These tests run bf16 autocast on CPU, which exercises
the same mixed-dtype paths: bf16 matrix products, fp32 softmax and losses, fp32 master weights.
"""

import dataclasses

import open_clip
import pytest
import torch
import torch.nn.functional as F

from capt_lib.backbones.base import Backbone
from capt_lib.confusion.bank import build_confusion_bank
from capt_lib.modules.adapter import DiffMannerAdapterConfig
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.modules.mgde import MGDEConfig
from capt_lib.prompts.coop import CoOpModel, PromptLearner
from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors, train_capt
from capt_lib.training.coop_trainer import CoOpConfig, train_coop
from capt_lib.training.losses import capt_loss
from capt_lib.utils.device import autocast, resolve_precision

CPU = torch.device("cpu")
NUM_CLASSES = 4
EMBED_DIM = 16
CONTEXT_LENGTH = 16
CLASSNAMES = ("coat", "boot", "shirt", "bag")
STEPS = 20  # optimisation steps of the stability runs
HIGH_LR = 0.05  # far above the trainers' defaults, to provoke overflow if any path is fragile
# Every CAPT module, small, with top-3 routing over the 3 experts so that every expert gets a gradient.
SMALL = CAPTConfig(
    adapter=DiffMannerAdapterConfig(heads=2),
    mgde=MGDEConfig(n_semantic_experts=2, n_sample_experts=1, n_centres=2, top_k=3),
)


def tiny_backbone() -> Backbone:
    """A random two-block CLIP with open_clip's BPE tokenizer, small enough for many steps on CPU."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=EMBED_DIM,
        vision_cfg=dict(image_size=16, patch_size=4, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=32, heads=2, layers=2),
    )
    return Backbone(
        model=model.eval().requires_grad_(False),
        tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH),
        preprocess=None,
        name="tiny-precision-clip",
        pretrained=None,
        key="tiny-precision-clip",
        image_size=16,
        context_length=CONTEXT_LENGTH,
        random_weights=True,
    )


def split_tensors(backbone: Backbone, n: int, seed: int) -> SplitTensors:
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tokens = backbone.visual_tokens(images)  # (n, 1 + 16, 32)
        features = F.normalize(backbone.visual_head(tokens), dim=-1)  # (n, EMBED_DIM)
    return SplitTensors(features, torch.arange(n) % NUM_CLASSES, torch.arange(n) + 1000 * seed, tokens)


def make_capt_model(backbone: Backbone, train: SplitTensors) -> CAPTModel:
    generator = torch.Generator().manual_seed(7)
    text = F.normalize(torch.randn(NUM_CLASSES, EMBED_DIM, generator=generator), dim=-1)
    logits = backbone.model.logit_scale.exp() * train.features @ text.T
    bank = build_confusion_bank(logits, train.labels, train.features, train.sample_ids, CLASSNAMES)
    common = F.normalize(torch.randn(NUM_CLASSES, NUM_CLASSES, EMBED_DIM, generator=generator), dim=-1)
    common = F.normalize(common + common.transpose(0, 1), dim=-1)  # commonality is symmetric in the pair
    difference = F.normalize(torch.randn(NUM_CLASSES, NUM_CLASSES, EMBED_DIM, generator=generator), dim=-1)
    torch.manual_seed(0)
    return CAPTModel(backbone, text, bank, common, difference, SMALL)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny_backbone()


# ---- resolving the setting ----------------------------------------------------------------


def test_fp16_on_cpu_warns_and_upcasts():
    with pytest.warns(UserWarning, match="fp16"):
        resolved = resolve_precision("fp16", CPU)

    assert resolved == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_keeps_fp32_and_bf16(precision):
    assert resolve_precision(precision, CPU) == precision


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="fp8"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ValueError, match="CAPTTrainConfig.precision"):
        CAPTTrainConfig(precision="half")
    with pytest.raises(ValueError, match="CoOpConfig.precision"):
        CoOpConfig(precision="half")


@pytest.mark.parametrize("precision, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_sets_matmul_dtype(precision, expected):
    a, b = torch.randn(3, 4), torch.randn(4, 2)

    with autocast(CPU, precision):
        product = a @ b

    assert product.dtype == expected
    torch.testing.assert_close(product.float(), a @ b, atol=0.05, rtol=0.02)


# ---- the text path: TextEncoder fed by a CoOp prompt learner ------------------------------


def test_coop_text_features_bf16_close_to_fp32(backbone):
    model = CoOpModel(backbone, PromptLearner(backbone, CLASSNAMES, ctx_init="a photo of a"))

    with torch.no_grad():
        reference = model.text_features()  # (C, E), fp32
        with autocast(CPU, "bf16"):
            mixed = model.text_features()

    cosines = (mixed.float() * reference).sum(dim=-1)
    assert torch.isfinite(mixed).all()
    assert cosines.min() > 0.99


def test_coop_context_stays_finite_in_bf16(backbone):
    model = CoOpModel(backbone, PromptLearner(backbone, CLASSNAMES, n_ctx=4, seed=0)).train()
    features = torch.randn(16, EMBED_DIM, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(16) % NUM_CLASSES
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=HIGH_LR, momentum=0.9)

    losses = []
    for _ in range(STEPS):
        with autocast(CPU, "bf16"):
            loss = F.cross_entropy(model.logits(features), labels)
        optimizer.zero_grad()
        loss.backward()
        grad = model.prompt_learner.ctx.grad
        assert torch.isfinite(loss)
        assert grad.dtype == torch.float32
        assert torch.isfinite(grad).all()
        optimizer.step()
        losses.append(loss.item())

    ctx = model.prompt_learner.ctx
    assert ctx.dtype == torch.float32  # the master weights stay fp32
    assert torch.isfinite(ctx).all()
    assert min(losses[-5:]) < losses[0]


# ---- the CAPT modules ---------------------------------------------------------------------


def test_capt_features_bf16_close_to_fp32(backbone):
    train = split_tensors(backbone, 16, seed=1)
    model = make_capt_model(backbone, train)

    with torch.no_grad():
        reference = model(train.features, tokens=train.tokens).features  # (B, E), fp32
        with autocast(CPU, "bf16"):
            mixed = model(train.features, tokens=train.tokens).features

    cosines = (mixed.float() * reference).sum(dim=-1)
    assert cosines.min() > 0.99


def test_capt_training_stays_finite_in_bf16(backbone):
    train = split_tensors(backbone, 16, seed=1)
    model = make_capt_model(backbone, train).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=HIGH_LR)

    losses = []
    for step in range(STEPS):
        with autocast(CPU, "bf16"):
            output = model(train.features, tokens=train.tokens)
            loss, _ = capt_loss(
                output.logits, train.labels, output.features, train.labels, model.class_text_features, 1.0, 0.07
            )
        optimizer.zero_grad()
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert torch.isfinite(loss), f"step {step}"
        assert grads, "no trainable weight received a gradient"
        assert all(g.dtype == torch.float32 for g in grads.values())
        assert [name for name, g in grads.items() if not torch.isfinite(g).all()] == [], f"step {step}"
        optimizer.step()
        losses.append(loss.item())

    trainable = model.trainable_parameters()
    assert {p.dtype for p in trainable} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in trainable)
    assert min(losses[-5:]) < losses[0]


# ---- the trainers' precision setting ------------------------------------------------------


def test_train_capt_bf16_setting_runs_autocast(backbone):
    train = split_tensors(backbone, 16, seed=1)
    val = split_tensors(backbone, 8, seed=2)
    config = CAPTTrainConfig(epochs=2, batch_size=8, lr=1e-2)

    fp32 = train_capt(make_capt_model(backbone, train), train, val, config)
    bf16 = train_capt(make_capt_model(backbone, train), train, val, dataclasses.replace(config, precision="bf16"))

    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in bf16.history)
    assert 0.0 <= bf16.best_val_accuracy <= 100.0
    # Rounding to bf16 changes the losses, which shows that the forward ran under autocast.
    assert bf16.history[0]["loss"] != fp32.history[0]["loss"]
    assert bf16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=0.05)


def test_train_capt_fp16_on_cpu_equals_fp32(backbone):
    train = split_tensors(backbone, 16, seed=1)
    config = CAPTTrainConfig(epochs=2, batch_size=8, lr=1e-2)

    fp32 = train_capt(make_capt_model(backbone, train), train, train, config)
    with pytest.warns(UserWarning, match="fp16"):
        fp16 = train_capt(make_capt_model(backbone, train), train, train, dataclasses.replace(config, precision="fp16"))

    assert fp16.history == fp32.history


def test_train_coop_bf16_setting_runs_autocast(backbone):
    features = torch.randn(16, EMBED_DIM, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(16) % NUM_CLASSES
    config = CoOpConfig(ctx_init=None, epochs=3, batch_size=8, lr=HIGH_LR)

    _, fp32 = train_coop(backbone, features, labels, CLASSNAMES, config)
    model, bf16 = train_coop(backbone, features, labels, CLASSNAMES, dataclasses.replace(config, precision="bf16"))

    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in bf16)
    assert model.prompt_learner.ctx.dtype == torch.float32
    assert bf16[-1]["loss"] != fp32[-1]["loss"]
    assert bf16[-1]["loss"] == pytest.approx(fp32[-1]["loss"], rel=0.1)
