"""Smoke test of the full pipeline on CPU with ViT-B-16 at 224 px.

ViT-B-16 is the backbone of the CAPT paper (Shao et al., CVPR 2026). The weights are
random: ``save_random_checkpoint`` writes them to a temporary file, which is then loaded
through ``load_backbone``, the path that real weights take. The data is a fake EuroSAT in
CoOp layout (10 classes, 1 image per class and split, 16 px JPEGs that the evaluation
transform resizes to 224 px). The test checks that every stage runs end to end and
returns finite metrics. The accuracies themselves mean nothing, and every printed number
is labelled "random weights".
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from capt_lib.backbones.loading import BackboneConfig, load_backbone, save_random_checkpoint
from capt_lib.data.fakes import make_fake_dataset
from capt_lib.prompts.semantic import pair_prompts_from_class_descriptions
from capt_lib.prompts.templates import CUSTOM_TEMPLATES
from capt_lib.runs.pipeline import build_bank, prepare_task, run_capt, run_coop, run_zero_shot
from capt_lib.training.capt_trainer import CAPTTrainConfig
from capt_lib.training.coop_trainer import CoOpConfig

pytestmark = pytest.mark.slow  # about a minute on 2 CPU cores, most of it the ViT-B-16 forwards

MODEL_NAME = "ViT-B-16"
TEMPLATES = [CUSTOM_TEMPLATES["EuroSAT"]]
GPU_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="session")
def vit_b16_checkpoint(tmp_path_factory):
    """Random ViT-B-16 weights in a safetensors file (about 600 MB), written once and deleted after the tests."""
    path = save_random_checkpoint(MODEL_NAME, tmp_path_factory.mktemp("weights") / "vit_b16_random.safetensors")
    yield path
    path.unlink(missing_ok=True)  # pytest keeps recent temporary folders, and this file is large


@pytest.fixture(scope="module")
def backbone(vit_b16_checkpoint):
    return load_backbone(BackboneConfig(MODEL_NAME, checkpoint=str(vit_b16_checkpoint)), device="cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task(backbone, cache_dir, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("data")
    make_fake_dataset("eurosat", data_root, images_per_class=1)
    return prepare_task(backbone, "eurosat", shots=1, seed=1, data_root=data_root, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def zero_shot(backbone, task):
    return run_zero_shot(backbone, task, TEMPLATES)


def report(label: str, metrics: dict) -> None:
    shown = ", ".join(f"{key}={value:.2f}" for key, value in metrics.items() if isinstance(value, float))
    print(f"random weights, {label}: {shown}")


def assert_percentages(metrics: dict, keys) -> None:
    for key in keys:
        value = metrics[key]
        assert math.isfinite(value), key
        assert 0.0 <= value <= 100.0, key


def test_checkpoint_loads_as_random_vit_b16(backbone, vit_b16_checkpoint):
    assert backbone.random_weights
    assert backbone.name == MODEL_NAME
    assert backbone.image_size == 224
    assert backbone.info["checkpoint"] == str(vit_b16_checkpoint)
    assert backbone.embed_dim == 512
    assert backbone.model.visual.transformer.width == 768


def test_task_caches_vit_b16_tokens(backbone, task):
    # 10 fake classes: the first 5 are base, 1 shot each; the test split has 1 image per class.
    assert task.train.tokens.shape == (5, 197, 768)  # 1 class token + a 14 x 14 patch grid
    assert task.train.features.shape == (5, 512)
    assert task.test_all.tokens.shape == (10, 197, 768)
    assert len(task.test_base) == 5
    assert len(task.test_novel) == 5

    # The cached features are the pooled, projected cached tokens.
    with torch.no_grad():
        pooled = F.normalize(backbone.visual_head(task.train.tokens), dim=-1)
    torch.testing.assert_close(task.train.features, pooled, atol=1e-4, rtol=1e-4)


def test_zero_shot_capt_pipeline(backbone, task, zero_shot, cache_dir):
    report("zero-shot", zero_shot["metrics"])
    assert_percentages(zero_shot["metrics"], ("base_accuracy", "novel_accuracy", "hm", "all_accuracy"))

    base_model = {"kind": "zero_shot", "templates": TEMPLATES}
    bank = build_bank(backbone, task, zero_shot["base_text"], base_model, cache_dir=cache_dir)
    descriptions = {name: [f"a satellite photo of {name}."] for name in task.classnames}
    prompts = pair_prompts_from_class_descriptions(descriptions, task.classnames, backbone.tokenizer)
    result = run_capt(backbone, task, bank, zero_shot, prompts, train_config=CAPTTrainConfig(epochs=1, batch_size=8))

    report("CAPT after 1 epoch", result["metrics"])
    assert_percentages(result["metrics"], ("base_accuracy", "novel_accuracy", "hm"))
    assert len(result["history"]) == 1
    assert math.isfinite(result["history"][0]["loss"])
    assert result["base_logits"].shape == (5, 5)
    assert torch.isfinite(result["base_logits"]).all()
    assert torch.isfinite(result["novel_logits"]).all()


def test_coop_pipeline(backbone, task):
    result = run_coop(backbone, task, CoOpConfig(epochs=1, warmup_epochs=0, batch_size=8))

    report("CoOp after 1 epoch", result["metrics"])
    assert_percentages(result["metrics"], ("base_accuracy", "novel_accuracy", "hm"))
    assert math.isfinite(result["history"][0]["loss"])
    assert result["base_text"].shape == (5, 512)
    assert torch.isfinite(result["novel_text"]).all()


def test_gpu_check_runs_on_cpu(vit_b16_checkpoint, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    # fp32, because bf16 matrix products on a CPU without bf16 units are about 10x slower.
    argv = ["--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0", "--precision", "fp32",
            "--checkpoint", str(vit_b16_checkpoint)]  # fmt: skip
    returned = gpu_check.main(argv)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert printed == returned
    assert printed["weights"] == "random weights"
    assert printed["image_size"] == 224
    assert printed["batch"] == 2
    assert printed["device"] == "cpu"
    assert printed["backbone_images_per_s"] > 0
    assert printed["capt_train_images_per_s"] > 0
    with capsys.disabled():
        print(f"random weights, gpu_check on CPU: {printed}")
