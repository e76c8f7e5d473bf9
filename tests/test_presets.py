"""Protocol, method and SLURM presets: loading, validation and resolved run settings.

Expected values come from the preset files and the upstream configs they cite (CoOp's
epochs per shot count, PromptSRC's per-protocol settings), and from the defaults of
capt's config dataclasses.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from capt_lib.runs.presets import PRESETS_DIR, list_presets, load_preset, resolve_run_settings
from capt_lib.runs.slurm import SlurmSettings

ALL_PRESETS = ["base_to_novel", "capt", "coop", "cross_dataset", "domain_generalization", "few_shot", "promptsrc", "slurm"]


@pytest.fixture
def presets_copy(tmp_path):
    """A writable copy of configs/presets."""
    folder = tmp_path / "presets"
    shutil.copytree(PRESETS_DIR, folder)
    return folder


def edit_preset(folder: Path, name: str, change) -> None:
    path = folder / f"{name}.yaml"
    content = yaml.safe_load(path.read_text())
    change(content)
    path.write_text(yaml.safe_dump(content))


def test_list_presets():
    assert list_presets() == ALL_PRESETS
    assert list_presets("protocol") == ["base_to_novel", "cross_dataset", "domain_generalization", "few_shot"]
    assert list_presets("method") == ["capt", "coop", "promptsrc"]
    assert list_presets("slurm") == ["slurm"]


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_loads(name):
    preset = load_preset(name)

    assert preset["name"] == name


def test_protocol_contents():
    base_to_novel = load_preset("base_to_novel")
    cross = load_preset("cross_dataset")
    generalization = load_preset("domain_generalization")
    few_shot = load_preset("few_shot")

    assert len(base_to_novel["datasets"]) == 11
    assert (base_to_novel["shots"], base_to_novel["seeds"], base_to_novel["classes"]) == ([16], [1, 2, 3], "base_to_novel")
    assert cross["datasets"] == ["imagenet"]
    assert len(cross["targets"]) == 10
    assert "imagenet" not in cross["targets"]
    assert generalization["targets"] == ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert (few_shot["shots"], few_shot["classes"]) == ([1, 2, 4, 8, 16], "all")


def test_unknown_preset():
    with pytest.raises(FileNotFoundError, match=r"preset 'nope' not found.*available presets: \['base_to_novel'"):
        load_preset("nope")


def test_unknown_key_names_file_and_key(presets_copy):
    edit_preset(presets_copy, "coop", lambda preset: preset["settings"]["train"].update(lrr=0.1))

    with pytest.raises(ValueError, match=r"coop.yaml: unknown key settings.train.lrr; valid keys: \['batch_size'"):
        load_preset("coop", directory=presets_copy)


def test_unknown_nested_key_names_file_and_key(presets_copy):
    edit_preset(presets_copy, "capt", lambda preset: preset["settings"]["model"].update(adapter={"head": 2}))

    with pytest.raises(ValueError, match=r"capt.yaml: unknown key settings.model.adapter.head; valid keys"):
        load_preset("capt", directory=presets_copy)


def test_unknown_protocol_key(presets_copy):
    edit_preset(presets_copy, "few_shot", lambda preset: preset.update(shot=[1]))

    with pytest.raises(ValueError, match=r"few_shot.yaml: unknown key shot; valid keys"):
        load_preset("few_shot", directory=presets_copy)


def test_unknown_rule_condition(presets_copy):
    edit_preset(presets_copy, "coop", lambda preset: preset["rules"][0]["when"].update(backbone="x"))

    with pytest.raises(ValueError, match=r"coop.yaml: unknown key rules\[0\].when.backbone"):
        load_preset("coop", directory=presets_copy)


def test_unknown_source_key(presets_copy):
    edit_preset(presets_copy, "coop", lambda preset: preset["sources"].update({"train.nctx": "somewhere"}))

    with pytest.raises(ValueError, match=r"coop.yaml: unknown key sources.train.nctx"):
        load_preset("coop", directory=presets_copy)


def test_name_must_match_file(presets_copy):
    edit_preset(presets_copy, "coop", lambda preset: preset.update(name="coop2"))

    with pytest.raises(ValueError, match=r"coop.yaml: name='coop2' must equal the file name 'coop'"):
        load_preset("coop", directory=presets_copy)


def test_invalid_yaml(presets_copy):
    (presets_copy / "broken.yaml").write_text("kind: [protocol\n")

    with pytest.raises(RuntimeError, match="could not parse preset"):
        load_preset("broken", directory=presets_copy)


def test_invalid_slurm_value(presets_copy):
    edit_preset(presets_copy, "slurm", lambda preset: preset.update(time_min=0))

    with pytest.raises(ValueError, match=r"slurm.yaml: SlurmSettings.time_min=0 is invalid"):
        load_preset("slurm", directory=presets_copy)


def test_slurm_preset_builds_settings():
    preset = load_preset("slurm")
    settings = SlurmSettings(**{key: value for key, value in preset.items() if key not in ("kind", "name", "description")})

    assert settings.gpus_per_task == 1


@pytest.mark.parametrize(("shots", "epochs"), [(1, 50), (2, 100), (4, 100), (8, 200), (16, 200)])
def test_coop_epochs_by_shots(shots, epochs):
    settings = resolve_run_settings("few_shot", "coop", "dtd", 1, {"shots": shots})

    assert settings["train"]["epochs"] == epochs


@pytest.mark.parametrize("shots", [1, 4, 16])
def test_coop_imagenet_uses_50_epochs(shots):
    assert resolve_run_settings("few_shot", "coop", "imagenet", 1, {"shots": shots})["train"]["epochs"] == 50


def test_capt_settings_are_complete():
    settings = resolve_run_settings("base_to_novel", "capt", "caltech101", 2)

    assert (settings["protocol"], settings["method"], settings["dataset"], settings["seed"]) == (
        "base_to_novel", "capt", "caltech101", 2)
    assert settings["shots"] == 16
    assert settings["classes"] == "base_to_novel"
    assert settings["backbone"]["model_name"] == "ViT-B-16"
    assert settings["backbone"]["precision"] == "fp16"
    assert (settings["train"]["epochs"], settings["train"]["batch_size"]) == (20, 4)
    assert settings["train"]["seed"] == 2
    assert settings["train"]["lam"] == 1.0  # CAPTTrainConfig's default
    assert settings["model"]["adapter"]["heads"] == 4  # CAPTConfig's default adapter, not the class default of 8
    assert settings["bank"]["base_model"] == "zero_shot"


def test_overrides_dotted_and_nested_agree():
    dotted = resolve_run_settings("base_to_novel", "capt", "dtd", 1, {"model.adapter.s": 2.0, "train.lr": 0.01})
    nested = resolve_run_settings("base_to_novel", "capt", "dtd", 1, {"model": {"adapter": {"s": 2.0}}, "train": {"lr": 0.01}})

    assert dotted["model"] == nested["model"]
    assert dotted["train"] == nested["train"]
    assert dotted["model"]["adapter"]["s"] == 2.0
    assert dotted["model"]["adapter"]["heads"] == 4  # the rest of the adapter keeps its defaults
    assert dotted["train"]["lr"] == 0.01
    assert "train.lr" not in dotted["provenance"]["sources"]
    assert "train.epochs" in dotted["provenance"]["sources"]


def test_invalid_overrides():
    with pytest.raises(ValueError, match=r"unknown key overrides.train.lrr"):
        resolve_run_settings("base_to_novel", "capt", "dtd", 1, {"train.lrr": 0.1})
    with pytest.raises(ValueError, match=r"train.seed must not be set"):
        resolve_run_settings("base_to_novel", "capt", "dtd", 1, {"train.seed": 5})
    with pytest.raises(ValueError, match=r"overrides must not set 'dataset'"):
        resolve_run_settings("base_to_novel", "capt", "dtd", 1, {"dataset": "x"})
    with pytest.raises(ValueError, match=r"CoOpConfig.epochs=0 is invalid"):
        resolve_run_settings("base_to_novel", "coop", "dtd", 1, {"train.epochs": 0})


def test_shots_must_match_protocol():
    with pytest.raises(ValueError, match=r"runs several shot counts \[1, 2, 4, 8, 16\]"):
        resolve_run_settings("few_shot", "coop", "dtd", 1)
    with pytest.raises(ValueError, match=r"shots=3 is invalid for protocol 'few_shot'"):
        resolve_run_settings("few_shot", "coop", "dtd", 1, {"shots": 3})


def test_method_as_protocol_is_rejected():
    with pytest.raises(ValueError, match="preset 'coop' is a method preset, not a protocol preset"):
        resolve_run_settings("coop", "coop", "dtd", 1)


def test_promptsrc_is_not_implemented():
    with pytest.raises(NotImplementedError, match=r"method 'promptsrc' .* is marked not implemented: capt has no deep-prompt"):
        resolve_run_settings("base_to_novel", "promptsrc", "dtd", 1)


@pytest.mark.parametrize(
    ("protocol", "dataset", "overrides", "expected"),
    [
        ("base_to_novel", "dtd", {}, {"prompt_depth_text": 9, "gpa_mean": 15, "gpa_std": 1, "epochs": 20}),
        ("cross_dataset", "imagenet", {}, {"prompt_depth_text": 3, "gpa_mean": 6, "gpa_std": 10, "epochs": 20}),
        ("few_shot", "caltech101", {"shots": 4}, {"prompt_depth_text": 9, "gpa_mean": 30, "gpa_std": 30, "epochs": 50}),
        ("few_shot", "dtd", {"shots": 4}, {"prompt_depth_text": 9, "gpa_mean": 45, "gpa_std": 5, "epochs": 50}),
    ],
)
def test_promptsrc_rules(protocol, dataset, overrides, expected):
    settings = resolve_run_settings(protocol, "promptsrc", dataset, 1, overrides, allow_not_implemented=True)

    assert {key: settings["train"][key] for key in expected} == expected


def test_provenance_records_revision_and_rules():
    settings = resolve_run_settings("few_shot", "coop", "imagenet", 3, {"shots": 1})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PRESETS_DIR, capture_output=True, text=True)

    provenance = settings["provenance"]
    assert provenance["git_revision"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert [rule["index"] for rule in provenance["rules_applied"]] == [0, 2]  # 1 shot, then ImageNet
    assert provenance["method_preset"] == str(PRESETS_DIR / "coop.yaml")
    assert provenance["overrides"] == {"shots": 1}
