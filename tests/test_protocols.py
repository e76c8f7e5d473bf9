"""Tests of capt_lib.runs.protocols: settings, the four protocol runs on fake datasets, and the tables.

The runs use a tiny open_clip ViT with random weights, saved to a local checkpoint and
loaded like real weights, on CoOp-format fakes (capt_lib.data.fakes). Their accuracies
mean nothing; the tests check the code paths, and check the numbers against slow
computations written out here (per-image encoding, means by hand).
"""

import dataclasses
import json
import math

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch

from capt_lib.data.styles import DOWNSTREAM_STYLE
from capt_lib.backbones.loading import save_random_checkpoint
from capt_lib.data.fakes import make_fake_dataset
from capt_lib.data.registry import load_dataset
from capt_lib.evaluation.tables import collect_results, read_results, write_results
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.runs import pipeline, protocols
from capt_lib.training.capt_trainer import CAPTTrainConfig
from capt_lib.utils.io import atomic_write_json

TINY_ARCH = "capt-test-protocols-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST_CAPT = {"train.epochs": 1}
FAST_COOP = {"train.epochs": 2}  # CoOp's one warmup epoch needs a second epoch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return save_random_checkpoint(TINY_ARCH, tmp_path_factory.mktemp("weights") / "random.safetensors", seed=0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_data")
    make_fake_dataset("eurosat", root, images_per_class=3, num_classes=6)
    make_fake_dataset("dtd", root, images_per_class=2, num_classes=4)
    make_fake_dataset("food101", root, images_per_class=2, num_classes=3)
    for name in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a"):
        make_fake_dataset(name, root, images_per_class=2, num_classes=4)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def backbone_section(checkpoint):
    return protocols.backbone_overrides(TINY_ARCH, None, str(checkpoint), precision="fp32")


@pytest.fixture(scope="module")
def clip(backbone_section, cache_dir):
    settings = protocols.resolve_protocol_settings("few_shot", "eurosat", 1, shots=1, backbone=backbone_section)
    return protocols.load_protocol_backbone(settings, "cpu", cache_dir)


def settings_for(protocol, dataset, backbone_section, **extra):
    return protocols.resolve_protocol_settings(
        protocol, dataset, 1, backbone=backbone_section, capt=FAST_CAPT, coop=FAST_COOP, **extra
    )


def accuracy_by_hand(clip, dataset, templates, num_classes=None):
    """Zero-shot accuracy (percent) over the first ``num_classes`` classes, every image and prompt encoded one at a time."""
    with torch.no_grad():
        text = []
        for name in dataset.classnames[:num_classes]:
            prompts = torch.cat([clip.encode_text([template.format(name)]) for template in templates])  # (T, E)
            mean = prompts.mean(dim=0)
            text.append(mean / mean.norm())
        text = torch.stack(text)  # (C, E)
        correct = 0
        for i in range(len(dataset)):
            image = clip.preprocess(dataset.load_image(i)).unsqueeze(0)  # (1, 3, H, W)
            feature = clip.model.encode_image(image)[0]
            correct += int((feature @ text.T).argmax().item() == dataset.labels[i])
    return 100.0 * correct / len(dataset)


def write_run(runs_dir, stem, dataset, seed, settings, metrics, status="ok", variant=None):
    """Write a finished run folder as the runner and the notebooks leave it."""
    run_dir = runs_dir / (variant or "") / stem / dataset / f"seed{seed}"
    atomic_write_json(run_dir / "run.json", {"status": status, "parameters": {"dataset": dataset, "seed": seed}})
    if status == "ok":
        write_results(run_dir, settings, metrics)
    return run_dir


def synthetic_settings(dataset, seed, *, random_weights=False, shots=16, targets=()):
    return {
        "dataset": dataset,
        "seed": seed,
        "shots": shots,
        "targets": list(targets),
        "backbone": {"model_name": "MiniCLIP", "miniclip_recipe": "default"},
        "backbone_record": {"random_weights": random_weights},
        "train": {"seed": seed, "epochs": 20},
        "coop": {"train": {"seed": seed, "epochs": 200}},
    }


# ---- datasets and settings ----------------------------------------------------------------


def test_style_dataset_names():
    plain = load_dataset("fashion_mnist", "test", style="plain")
    named = load_dataset("fashion_mnist_plain", "test")
    upside_down = load_dataset("fashion_mnist_upside_down", "test")
    negative = load_dataset("fashion_mnist_negative", "test")
    default = load_dataset("fashion_mnist", "test")
    in_downstream_style = load_dataset(f"fashion_mnist_{DOWNSTREAM_STYLE}", "test")

    assert np.array_equal(named.images, plain.images)
    assert np.array_equal(upside_down.images, plain.images[:, ::-1])
    assert np.array_equal(negative.images, 255 - plain.images)
    assert np.array_equal(default.images, in_downstream_style.images)
    assert np.array_equal(named.labels, default.labels)
    with pytest.raises(ValueError, match="'plain' style"):
        load_dataset("fashion_mnist_plain", "test", style="blur")


def test_settings_follow_presets(backbone_section):
    settings = protocols.resolve_protocol_settings("base_to_novel", "eurosat", 2, backbone=backbone_section)

    assert settings["protocol"] == "base_to_novel"
    assert settings["shots"] == 16
    assert settings["train"]["epochs"] == 20  # capt.yaml
    assert settings["train"]["seed"] == 2
    assert settings["coop"]["train"]["epochs"] == 200  # coop.yaml at 16 shots
    assert settings["coop"]["train"]["seed"] == 2
    assert settings["backbone"]["model_name"] == TINY_ARCH
    assert settings["backbone"]["pretrained"] is None
    assert settings["zero_shot"]["templates"] == ["a centered satellite photo of {}."]
    assert settings["targets"] == []
    assert settings["methods"] == ["zero_shot", "coop", "capt"]
    assert settings["provenance"]["coop"]["method_preset"].endswith("coop.yaml")


def test_settings_reject_bad_values(backbone_section):
    with pytest.raises(ValueError, match="shots=4 is invalid"):
        protocols.resolve_protocol_settings("base_to_novel", "eurosat", 1, shots=4, backbone=backbone_section)
    with pytest.raises(ValueError, match="several shot counts"):
        protocols.resolve_protocol_settings("few_shot", "eurosat", 1, backbone=backbone_section)
    with pytest.raises(ValueError, match="unknown"):
        protocols.resolve_protocol_settings("few_shot", "eurosat", 1, shots=4, methods=["capt", "maple"])
    with pytest.raises(ValueError, match="protocol='zero_shot' is invalid"):
        protocols.resolve_protocol_settings("zero_shot", "eurosat", 1)
    with pytest.raises(ValueError, match="tests no target datasets"):
        protocols.resolve_protocol_settings("few_shot", "eurosat", 1, shots=4, targets=["dtd"])


def test_coop_skipped_when_not_needed(backbone_section):
    settings = protocols.resolve_protocol_settings("few_shot", "eurosat", 1, shots=4, methods=["capt"], backbone=backbone_section)

    assert settings["coop"] is None
    assert settings["methods"] == ["capt"]
    with pytest.raises(ValueError, match="no CoOp section"):
        protocols.coop_config(settings)


def test_default_targets(backbone_section):
    def targets(protocol, dataset):
        return protocols.resolve_protocol_settings(protocol, dataset, 1, backbone=backbone_section)["targets"]

    assert targets("cross_dataset", "imagenet") == [
        "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
        "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
    ]
    assert targets("domain_generalization", "imagenet") == ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    # Every style except the downstream one ("upside_down"), which fashion_mnist itself uses.
    assert targets("domain_generalization", "fashion_mnist") == [
        "fashion_mnist_plain", "fashion_mnist_negative", "fashion_mnist_blur", "fashion_mnist_noisy",
    ]
    assert targets("cross_dataset", "fashion_mnist_plain") == [
        "fashion_mnist_negative", "fashion_mnist_blur", "fashion_mnist_noisy",
    ]
    with pytest.raises(ValueError, match="no default targets"):
        targets("cross_dataset", "eurosat")


def test_config_from_dict_round_trip():
    config = pipeline.capt_config_with(CAPTConfig(), sem__k=3, adapter__blocks=(-2,), mgde__n_centres=2)
    stored = json.loads(json.dumps(dataclasses.asdict(config)))  # lists where tuples were

    assert protocols.config_from_dict(CAPTConfig, stored) == config
    with pytest.raises(ValueError, match="no field"):
        protocols.config_from_dict(CAPTTrainConfig, {"epochs": 2, "learning_rate": 0.1})


# ---- protocol runs on fakes ----------------------------------------------------------------


def test_base_to_novel_run(clip, backbone_section, data_root, cache_dir, tmp_path):
    settings = settings_for("base_to_novel", "eurosat", backbone_section)
    result = protocols.run_base_to_novel(clip, settings, data_root=data_root, cache_dir=cache_dir)
    metrics = result.metrics

    for prefix in ("", "coop_", "zero_shot_"):
        for name in ("base_accuracy", "novel_accuracy", "hm"):
            assert 0.0 <= metrics[prefix + name] <= 100.0
        base, novel = metrics[prefix + "base_accuracy"], metrics[prefix + "novel_accuracy"]
        expected_hm = 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
        assert metrics[prefix + "hm"] == pytest.approx(expected_hm)
    assert metrics["newly_wrong"] >= 0

    task = result.outputs["task"]
    base_test = load_dataset("eurosat", "test", data_root).subset(np.flatnonzero(task.test_dataset.labels < 3))
    assert metrics["zero_shot_base_accuracy"] == pytest.approx(
        accuracy_by_hand(clip, base_test, settings["zero_shot"]["templates"], num_classes=3), abs=1e-6
    )
    assert result.settings["backbone_record"]["random_weights"] is True

    path = write_results(tmp_path, result.settings, result.metrics)
    assert read_results(path)["metrics"]["hm"] == pytest.approx(metrics["hm"])


def test_few_shot_run(clip, backbone_section, data_root, cache_dir):
    settings = settings_for("few_shot", "eurosat", backbone_section, shots=2)
    result = protocols.run_few_shot(clip, settings, data_root=data_root, cache_dir=cache_dir)
    task = result.outputs["task"]

    assert np.bincount(task.train.labels.numpy()).tolist() == [2] * 6
    assert np.bincount(task.val.labels.numpy()).tolist() == [2] * 6
    assert len(task.test) == 6 * 3
    test = load_dataset("eurosat", "test", data_root)
    assert result.metrics["zero_shot_accuracy"] == pytest.approx(
        accuracy_by_hand(clip, test, settings["zero_shot"]["templates"]), abs=1e-6
    )
    for name in ("accuracy", "coop_accuracy"):
        assert 0.0 <= result.metrics[name] <= 100.0
    assert "target_accuracy" not in result.metrics


def test_transfer_run(clip, backbone_section, data_root, cache_dir):
    targets = ["imagenetv2", "imagenet_sketch", "imagenet_a"]
    settings = settings_for("domain_generalization", "imagenet", backbone_section, targets=targets)
    result = protocols.run_transfer(clip, settings, data_root=data_root, cache_dir=cache_dir)
    metrics = result.metrics

    for name in ("target_accuracy", "coop_target_accuracy", "zero_shot_target_accuracy"):
        assert list(metrics[name]) == targets
    imagenet_a = load_dataset("imagenet_a", "test", data_root)
    assert metrics["zero_shot_target_accuracy"]["imagenet_a"] == pytest.approx(
        accuracy_by_hand(clip, imagenet_a, settings["target_templates"]["imagenet_a"]), abs=1e-6
    )
    flat = protocols.flatten_metrics(metrics)
    assert flat["target_accuracy/imagenet_sketch"] == metrics["target_accuracy"]["imagenet_sketch"]


def test_untrained_capt_transfers_as_base_model(clip, backbone_section, data_root, cache_dir):
    """CAPT's modules start as the identity, so an untrained model predicts what its base model predicts."""
    settings = settings_for("cross_dataset", "eurosat", backbone_section, targets=["dtd"])
    source = protocols.prepare_all_class_task(clip, "eurosat", 2, 1, data_root=data_root, cache_dir=cache_dir)
    source_text = pipeline.zero_shot_text_features(clip, source.classnames, settings["zero_shot"]["templates"])
    source_prompts = protocols.load_protocol_prompts("eurosat", source.classnames, clip)
    common, difference = pipeline.encode_prompts_for(clip, source_prompts, source.classnames)
    untrained = CAPTModel(clip, source_text, None, common, difference, CAPTConfig())

    target = load_dataset("dtd", "test", data_root)
    split = protocols.encode_split(clip, target, cache_dir)
    target_text = pipeline.zero_shot_text_features(clip, target.classnames, settings["target_templates"]["dtd"])
    prompts = protocols.load_protocol_prompts("dtd", target.classnames, clip)
    logits = protocols.transfer_capt(clip, untrained, target_text, prompts, target.classnames, split, settings)

    expected = pipeline.logits_from_text(clip, split.features, target_text).argmax(dim=1)
    assert torch.equal(logits.argmax(dim=1), expected)


def test_transfer_to_too_few_classes(clip, backbone_section, data_root, cache_dir):
    settings = settings_for("cross_dataset", "eurosat", backbone_section, targets=["food101"])
    names = load_dataset("eurosat", "test", data_root).classnames
    prompts = protocols.load_protocol_prompts("eurosat", names, clip)
    common, difference = pipeline.encode_prompts_for(clip, prompts, names)
    source_model = CAPTModel(clip, torch.randn(6, 32), None, common, difference, CAPTConfig())

    target = load_dataset("food101", "test", data_root)
    split = protocols.encode_split(clip, target, cache_dir)
    target_prompts = protocols.load_protocol_prompts("food101", target.classnames, clip)
    with pytest.warns(UserWarning, match="n_centres"), pytest.raises(ValueError, match="lower it"):
        protocols.transfer_capt(clip, source_model, torch.randn(3, 32), target_prompts, target.classnames, split, settings)


def test_in_block_adapter_rejected(clip, backbone_section, data_root, cache_dir):
    settings = protocols.resolve_protocol_settings(
        "few_shot", "eurosat", 1, shots=1, methods=["capt"], backbone=backbone_section,
        capt={"model.adapter.placement": "in_blocks", "model.adapter.blocks": [-1]},
    )
    with pytest.raises(ValueError, match="after_last_block"):
        protocols.run_few_shot(clip, settings, data_root=data_root, cache_dir=cache_dir)


# ---- runs of a notebook ----------------------------------------------------------------------


def test_find_runs_dir(tmp_path):
    runs = tmp_path / "runs"
    plain = runs / "09_few_shot" / "fashion_mnist" / "seed1"
    variant = runs / "shots-4_epochs-2" / "09_few_shot" / "fashion_mnist" / "seed2"
    atomic_write_json(variant / "run.json", {"parameters": {"shots": 4, "epochs": 2, "seed": 2}})
    unlisted = runs / "shots-8" / "09_few_shot" / "fashion_mnist" / "seed1"
    atomic_write_json(unlisted / "run.json", {"parameters": {"shots": 4}})

    assert protocols.find_runs_dir(plain, "notebooks/09_few_shot.ipynb", "fashion_mnist", 1) == runs.resolve()
    assert protocols.find_runs_dir(variant, "09_few_shot.ipynb", "fashion_mnist", 2) == runs.resolve()
    assert protocols.find_runs_dir(unlisted, "09_few_shot.ipynb", "fashion_mnist", 1) == (runs / "shots-8").resolve()
    assert protocols.find_runs_dir(plain, "06_base_to_novel.ipynb", "fashion_mnist", 1) is None
    assert protocols.find_runs_dir(plain, "09_few_shot.ipynb", "fashion_mnist", 2) is None
    assert protocols.find_runs_dir(tmp_path / "09_few_shot", "09_few_shot.ipynb", "fashion_mnist", 1) is None


def test_current_run_joins_the_finished_ones(tmp_path):
    runs_dir = tmp_path / "runs"
    stem = "06_base_to_novel"
    write_run(runs_dir, stem, "fashion_mnist", 1, synthetic_settings("fashion_mnist", 1), {"base_accuracy": 80.0, "novel_accuracy": 60.0})
    write_run(runs_dir, stem, "fashion_mnist", 3, {}, {}, status="failed")
    current = runs_dir / stem / "fashion_mnist" / "seed2"
    atomic_write_json(current / "run.json", {"status": "running", "parameters": {"dataset": "fashion_mnist", "seed": 2}})

    runs = protocols.collect_protocol_runs(
        f"notebooks/{stem}.ipynb", current, synthetic_settings("fashion_mnist", 2), {"base_accuracy": 70.0, "novel_accuracy": 50.0}
    )

    assert runs["seed"].tolist() == [1, 2, 3]
    assert runs["status"].tolist() == ["ok", "ok", "failed"]
    assert runs["base_accuracy"].tolist()[:2] == [80.0, 70.0]
    assert runs.loc[1, "parameters"] == {"dataset": "fashion_mnist", "seed": 2}


def test_current_run_averages_with_stored_runs(tmp_path):
    """Settings in memory contain tuples where results.json contains lists, and both must count as equal."""
    runs_dir = tmp_path / "runs"
    stem = "06_base_to_novel"
    settings = {seed: {**synthetic_settings("fashion_mnist", seed), "model": {"adapter": {"blocks": (-1,)}}} for seed in (1, 2, 3)}
    for seed in (1, 2):
        write_run(runs_dir, stem, "fashion_mnist", seed, settings[seed], {"base_accuracy": 80.0, "novel_accuracy": 60.0})
    current = runs_dir / stem / "fashion_mnist" / "seed3"

    runs = protocols.collect_protocol_runs(stem, current, settings[3], {"base_accuracy": 83.0, "novel_accuracy": 63.0})
    table = protocols.base_to_novel_tables(runs, methods=["capt"]).loc["CAPT"]

    assert table.loc["fashion_mnist", "status"] == "ok"
    assert table.loc["fashion_mnist", "base"] == pytest.approx(81.0)


def test_run_outside_runs_layout_is_alone(tmp_path):
    write_run(tmp_path, "06_base_to_novel", "fashion_mnist", 1, synthetic_settings("fashion_mnist", 1), {"base_accuracy": 1.0})
    output_dir = tmp_path / "06_base_to_novel"

    runs = protocols.collect_protocol_runs(
        "06_base_to_novel.ipynb", output_dir, synthetic_settings("fashion_mnist", 2), {"base_accuracy": 5.0, "novel_accuracy": 5.0}
    )

    assert len(runs) == 1
    assert runs.loc[0, "seed"] == 2


def test_method_runs_strip_prefixes():
    runs = pd.DataFrame([{"dataset": "dtd", "seed": 1, "status": "ok", "run_dir": "r", "settings": {},
                          "base_accuracy": 3.0, "coop_base_accuracy": 2.0, "zero_shot_base_accuracy": 1.0,
                          "zero_shot_target_accuracy/x": 4.0}])

    assert protocols.method_runs(runs, "zero_shot")["base_accuracy"].item() == 1.0
    assert protocols.method_runs(runs, "zero_shot")["target_accuracy/x"].item() == 4.0
    assert protocols.method_runs(runs, "coop")["base_accuracy"].item() == 2.0
    capt = protocols.method_runs(runs, "capt")
    assert capt["base_accuracy"].item() == 3.0
    assert "coop_base_accuracy" not in capt.columns
    with pytest.raises(ValueError, match="method='promptsrc'"):
        protocols.method_runs(runs, "promptsrc")


# ---- tables --------------------------------------------------------------------------------


@pytest.fixture
def base_to_novel_runs(tmp_path):
    """Three seeds of dtd and fashion_mnist, one seed of eurosat; the dtd backbone has random weights."""
    runs_dir = tmp_path / "runs"
    stem = "06_base_to_novel"
    capt = {1: (80.0, 60.0), 2: (82.0, 62.0), 3: (84.0, 70.0)}
    for seed, (base, novel) in capt.items():
        metrics = {"base_accuracy": base, "novel_accuracy": novel, "coop_base_accuracy": base - 10,
                   "coop_novel_accuracy": novel - 20, "zero_shot_base_accuracy": 50.0, "zero_shot_novel_accuracy": 40.0}
        write_run(runs_dir, stem, "dtd", seed, synthetic_settings("dtd", seed, random_weights=True), metrics)
        write_run(runs_dir, stem, "fashion_mnist", seed, synthetic_settings("fashion_mnist", seed), metrics)
    write_run(runs_dir, stem, "eurosat", 1, synthetic_settings("eurosat", 1), {"base_accuracy": 1.0, "novel_accuracy": 2.0})
    return collect_results(runs_dir, stem)


def test_base_to_novel_tables(base_to_novel_runs):
    tables = protocols.base_to_novel_tables(base_to_novel_runs)
    capt, coop = tables.loc["CAPT"], tables.loc["CoOp"]

    assert capt.loc["dtd", "base"] == pytest.approx(82.0)
    assert capt.loc["dtd", "novel"] == pytest.approx(64.0)
    assert capt.loc["dtd", "hm"] == pytest.approx(2 * 82.0 * 64.0 / (82.0 + 64.0))
    assert capt.loc["dtd", "novel_std"] == pytest.approx(math.sqrt(((60 - 64) ** 2 + (62 - 64) ** 2 + (70 - 64) ** 2) / 2))
    assert coop.loc["dtd", "novel"] == pytest.approx(44.0)
    assert capt.loc["eurosat", "status"] == "incomplete (seeds 1 of 1, 2, 3)"
    assert capt.loc["imagenet", "status"] == "not run yet"
    assert capt.loc["fashion_mnist", "status"] == "ok"
    assert capt.loc["average", "status"] == "incomplete (2 of 12 datasets complete)"
    assert capt.loc["dtd", "backbone"] == "MiniCLIP (default), RANDOM WEIGHTS"
    assert capt.loc["fashion_mnist", "backbone"] == "MiniCLIP (default)"
    assert capt.loc["imagenet", "backbone"] == ""


def test_capt_paper_comparison(base_to_novel_runs):
    comparison = protocols.capt_paper_comparison(base_to_novel_runs)

    assert comparison.index.tolist()[:12] == [*protocols.BASE_TO_NOVEL_DATASETS, "average"]
    assert comparison.index.tolist()[12:] == ["fashion_mnist"]  # eurosat is one of the eleven
    assert comparison.loc["dtd", "paper_base"] == 88.19
    assert comparison.loc["dtd", "base_diff"] == pytest.approx(82.0 - 88.19)
    assert comparison.loc["average", "paper_hm"] == 83.90
    assert math.isnan(comparison.loc["average", "hm"])
    assert math.isnan(comparison.loc["fashion_mnist", "paper_base"])
    assert comparison.loc["fashion_mnist", "base"] == pytest.approx(82.0)


def test_method_average_table(base_to_novel_runs):
    averages = protocols.method_average_table(base_to_novel_runs)

    assert averages.loc[(protocols.OURS_SOURCE_LABEL, "CAPT"), "status"] == "incomplete (1 of 11 datasets complete)"
    assert averages.loc[(protocols.PAPER_SOURCE_LABEL, "CoOp"), "hm"] == 71.66
    assert averages.loc[(protocols.PAPER_SOURCE_LABEL, "PromptKD"), "novel"] == 80.73
    assert averages.loc[(protocols.PAPER_SOURCE_LABEL, "CAPT"), "base"] == 87.41


def test_random_weights_note(base_to_novel_runs):
    note = protocols.random_weights_note(base_to_novel_runs)

    assert note.startswith("3 run(s) used a backbone with RANDOM WEIGHTS (dtd seed 1, dtd seed 2, dtd seed 3)")
    assert protocols.random_weights_note(base_to_novel_runs[base_to_novel_runs["dataset"] != "dtd"]) == ""


def test_transfer_tables_offline_source(tmp_path):
    runs_dir = tmp_path / "runs"
    stem = "08_domain_generalization"
    targets = ["fashion_mnist_plain", "fashion_mnist_noisy"]
    for seed in (1, 2, 3):
        metrics = {"accuracy": 70.0 + seed, "target_accuracy": {"fashion_mnist_plain": 50.0 + seed, "fashion_mnist_noisy": 10.0 * seed},
                   "zero_shot_accuracy": 40.0, "zero_shot_target_accuracy": {"fashion_mnist_plain": 30.0, "fashion_mnist_noisy": 20.0}}
        write_run(runs_dir, stem, "fashion_mnist", seed, synthetic_settings("fashion_mnist", seed, targets=targets), metrics)
    runs = collect_results(runs_dir, stem)

    tables = protocols.transfer_tables(runs, "domain_generalization", methods=["zero_shot", "capt"])
    capt = tables.loc["CAPT"].loc["fashion_mnist"]

    assert capt.loc["fashion_mnist", "accuracy"] == pytest.approx(72.0)
    assert capt.loc["fashion_mnist_noisy", "accuracy"] == pytest.approx(20.0)
    assert capt.loc["fashion_mnist_noisy", "accuracy_std"] == pytest.approx(10.0)
    assert capt.loc["average", "accuracy"] == pytest.approx((52.0 + 20.0) / 2)
    assert tables.loc["zero-shot CLIP"].loc["fashion_mnist"].loc["fashion_mnist_plain", "accuracy"] == pytest.approx(30.0)
    assert tables.loc["CAPT"].loc["imagenet"].loc["imagenet_sketch", "status"] == "not run yet"
    assert tables.loc["CAPT"].loc["imagenet"].index.tolist() == ["imagenet", *protocols.DOMAIN_GENERALIZATION_TARGETS, "average"]


def test_few_shot_tables_and_overview(tmp_path):
    runs_dir = tmp_path / "runs"
    stem = "09_few_shot"
    for seed, value in zip((1, 2, 3), (60.0, 62.0, 67.0)):
        settings = synthetic_settings("fashion_mnist", seed, shots=4)
        write_run(runs_dir, stem, "fashion_mnist", seed, settings, {"accuracy": value, "coop_accuracy": value - 5}, variant="shots-4")
    write_run(runs_dir, stem, "fashion_mnist", 1, synthetic_settings("fashion_mnist", 1, shots=8), {"accuracy": 1.0}, variant="shots-8")
    runs = collect_results(runs_dir, stem)

    tables = protocols.few_shot_tables(runs, methods=["coop", "capt"])
    overview = protocols.few_shot_overview(tables, 4)
    std = math.sqrt(((60 - 63) ** 2 + (62 - 63) ** 2 + (67 - 63) ** 2) / 2)

    assert tables.loc[("CAPT", "fashion_mnist", 4), "accuracy"] == pytest.approx(63.0)
    assert overview.loc["fashion_mnist", "CAPT"] == f"63.00 ± {std:.2f}"
    assert overview.loc["fashion_mnist", "CoOp"] == f"58.00 ± {std:.2f}"
    assert overview.loc["imagenet", "CAPT"] == "not run yet"
    assert protocols.few_shot_overview(tables, 8).loc["fashion_mnist", "CAPT"] == "incomplete (seeds 1 of 1, 2, 3)"
    assert overview.loc["fashion_mnist", "backbone"] == "MiniCLIP (default)"


def test_markdown_and_written_tables(base_to_novel_runs, tmp_path):
    comparison = protocols.capt_paper_comparison(base_to_novel_runs)
    markdown = protocols.protocol_table_markdown(comparison)

    assert "| imagenet | - | 80.51 | - |" in markdown
    assert "not run yet" in markdown
    assert "incomplete (seeds 1 of 1, 2, 3)" in markdown
    written = protocols.write_tables(tmp_path / "tables", {"capt_vs_paper": comparison})
    assert [path.name for path in written] == ["capt_vs_paper.csv", "capt_vs_paper.md"]
    assert written[1].read_text() == markdown
    assert pd.read_csv(written[0], index_col=0).loc["dtd", "paper_base"] == 88.19


def test_backbone_label():
    assert protocols.backbone_label({"backbone": {"model_name": "ViT-B-16", "pretrained": "openai"}}) == "ViT-B-16 (openai)"
    label = protocols.backbone_label({
        "backbone": {"model_name": "ViT-B-16", "pretrained": None, "checkpoint": "/w/random.safetensors"},
        "backbone_record": {"random_weights": True},
    })
    assert label == "ViT-B-16 (random.safetensors), RANDOM WEIGHTS"
