"""Tests of benchmarks/cost.py on a tiny random open_clip ViT.

The tests check that every timed code path runs and trains, that the times are positive
and that the ratios follow from the times. They never assert a speed, because timings on
a shared test machine depend on the other jobs more than on the code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from capt_lib.modules.capt_model import CAPTConfig
from capt_lib.prompts.coop import PromptLearner
from capt_lib.training.capt_trainer import CAPTTrainConfig
from capt_lib.training.coop_trainer import CoOpConfig

REPO = Path(__file__).resolve().parents[1]

# A one-block ViT with a 4x4 patch grid. The text context stays at 77 tokens, as the real tokenizer needs.
TINY_ARCH = "capt-test-cost-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# Four classes give 18 distinct pair prompt features, enough for MGDE's default 2 x 8 K-means centres.
TINY_SETTINGS = dict(
    model_name=TINY_ARCH,
    classes=4,
    shots=2,
    batch_size=4,
    repeats=2,
    recompute_repeats=2,
    retrieval_bank_size=400,
    retrieval_repeats=1,
    retrieval_loop_repeats=1,
    device="cpu",
)


def load_cost_module():
    # The module is registered before it runs, because dataclasses look their module up in sys.modules.
    spec = importlib.util.spec_from_file_location("cost_benchmark_under_test", REPO / "benchmarks" / "cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cost = load_cost_module()


@pytest.fixture(scope="module", autouse=True)
def tiny_architecture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cost_open_clip_configs")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cost_cache")


@pytest.fixture(scope="module")
def backbone(cache_dir):
    return cost.load_random_backbone(cost.CostSettings(**TINY_SETTINGS), cache_dir)


@pytest.fixture(scope="module")
def task(backbone):
    return cost.synthetic_task(backbone, classes=4, shots=2, seed=0)


def trainable_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def test_cost_ratios_from_times():
    times = {
        "capt_epoch": 2.0,
        "coop_epoch": 4.0,
        "recompute_epoch": 50.0,
        "retrieval_batched": 0.01,
        "retrieval_loop": 0.3,
    }

    ratios = cost.cost_ratios(times)

    assert ratios["capt_over_coop"]["ratio"] == pytest.approx(0.5)
    assert ratios["capt_over_coop"]["met"] is True
    assert ratios["recompute_over_cached"]["ratio"] == pytest.approx(25.0)
    assert ratios["recompute_over_cached"]["met"] is True
    assert ratios["retrieval_loop_over_batched"]["ratio"] == pytest.approx(30.0)
    assert ratios["retrieval_loop_over_batched"]["met"] is False


def test_cost_ratios_at_and_past_targets():
    at_targets = {
        "capt_epoch": 1.3,
        "coop_epoch": 1.0,
        "recompute_epoch": 26.0,
        "retrieval_batched": 0.02,
        "retrieval_loop": 1.0,
    }
    past_targets = {**at_targets, "capt_epoch": 1.4, "recompute_epoch": 25.0, "retrieval_loop": 0.98}

    assert all(entry["met"] for entry in cost.cost_ratios(at_targets).values())
    assert not any(entry["met"] for entry in cost.cost_ratios(past_targets).values())
    assert cost.cost_ratios(at_targets)["capt_over_coop"]["target"] == "<= 1.3"
    assert cost.cost_ratios(at_targets)["recompute_over_cached"]["target"] == ">= 20"


def test_settings_reject_invalid_sizes():
    with pytest.raises(ValueError, match="CostSettings.classes=2"):
        cost.CostSettings(classes=2)
    with pytest.raises(ValueError, match="CostSettings.repeats=0"):
        cost.CostSettings(repeats=0)
    with pytest.raises(ValueError, match="CostSettings.threads=0"):
        cost.CostSettings(threads=0)


def test_random_checkpoint_written_once(cache_dir, backbone):
    path = cost.random_checkpoint(TINY_ARCH, seed=0, cache_dir=cache_dir)
    modified = path.stat().st_mtime_ns

    again = cost.random_checkpoint(TINY_ARCH, seed=0, cache_dir=cache_dir)

    assert path == Path(cache_dir) / "random_checkpoints" / f"{TINY_ARCH}-seed0.safetensors"
    assert again == path
    assert again.stat().st_mtime_ns == modified
    assert backbone.random_weights


def test_synthetic_task_shapes(task):
    assert task.classnames == ("class 0", "class 1", "class 2", "class 3")
    assert task.images.shape == (8, 3, 32, 32)
    assert task.split.tokens.shape == (8, 1 + 16, 32)
    assert task.split.features.shape == (8, 32)
    assert task.split.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert task.encode_seconds > 0


def test_recomputed_split_matches_cached_tokens(backbone, task):
    split = cost.RecomputedSplit(task.split, task.images, backbone)
    rows = torch.tensor([5, 0, 3])

    batch = split.batch(rows, torch.device("cpu"))

    torch.testing.assert_close(batch["tokens"], task.split.tokens[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["base_features"], task.split.features[rows], atol=1e-5, rtol=1e-5)
    assert set(batch) == {"base_features", "tokens"}


def test_capt_runners_train_both_paths(backbone, task):
    config = dataclasses.replace(CAPTTrainConfig(), batch_size=4)
    val = cost.first_rows(task.split, 1)
    paths = {
        "cached": (task.split, val),
        "recomputed": (
            cost.RecomputedSplit(task.split, task.images, backbone),
            cost.RecomputedSplit(val, task.images[:1], backbone),
        ),
    }
    for name, (train, val_split) in paths.items():
        model = cost.build_capt_model(backbone, task, CAPTConfig(), seed=0)
        before = trainable_copy(model)

        result = cost.capt_epoch_runner(model, train, val_split, config)()

        after = trainable_copy(model)
        assert model.sam is not None, name
        assert len(result.history) == 1, name
        assert any(not torch.equal(before[key], after[key]) for key in before), name


def test_coop_runner_trains_context(backbone, task):
    config = dataclasses.replace(CoOpConfig(), batch_size=4, lr=0.1)
    initial = PromptLearner(backbone, task.classnames, n_ctx=config.n_ctx, ctx_init=config.ctx_init).ctx.detach()

    model, history = cost.coop_epoch_runner(backbone, task, config)()

    assert len(history) == 1
    assert not torch.equal(initial, model.prompt_learner.ctx.detach())


def test_retrieved_per_step_counts_distinct_rows(backbone, task):
    model = cost.build_capt_model(backbone, task, CAPTConfig(), seed=0)
    config = dataclasses.replace(CAPTTrainConfig(), batch_size=4)
    expected = []
    for rows in (torch.arange(0, 4), torch.arange(4, 8)):
        # Slow path: SEM and SAM image by image, then the distinct bank rows of the batch.
        found = set()
        for row in rows.tolist():
            features = task.split.features[row : row + 1]
            mined = model.sem(model.base_probabilities(features))
            ids = task.split.sample_ids[row : row + 1]
            retrieved = model.sam.retrieve(features, mined.pseudo_labels, mined.pair_classes, ids)
            found.update(r for r in retrieved.flatten().tolist() if r >= 0)
        expected.append(len(found))

    assert cost.retrieved_per_step(model, task.split, config) == pytest.approx(sum(expected) / 2)


def test_epoch_times_skip_warmup():
    calls = []

    times = cost.epoch_times(lambda: calls.append(1), repeats=3, device=torch.device("cpu"), name="no-op")

    assert len(calls) == 4
    assert len(times.wall) == 3
    assert len(times.cpu) == 3
    assert all(t >= 0 for t in times.wall + times.cpu)


def test_retrieval_bank_size_out_of_range():
    with pytest.raises(ValueError, match="retrieval_bank_size=9000"):
        cost.retrieval_timing(torch.device("cpu"), bank_size=9000, repeats=1, loop_repeats=1, seed=0)


def test_main_writes_results(cache_dir, tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = [
        "--model", TINY_ARCH, "--classes", "4", "--shots", "2", "--batch-size", "4", "--repeats", "2", "--recompute-repeats", "2",
        "--retrieval-bank-size", "400", "--retrieval-repeats", "1", "--retrieval-loop-repeats", "1",
        "--device", "cpu", "--cache-dir", str(cache_dir), "--out", str(out),
    ]

    cost.main(argv)

    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "random weights: timing only" in printed
    assert result["random_weights"] is True
    assert result["training_images"] == 8
    assert result["steps_per_epoch"] == 2
    for name in ("coop", "capt", "recompute"):
        assert len(result["epoch_seconds"][name]) == 2
        assert all(t > 0 for t in result["epoch_seconds"][name])
        assert len(result["epoch_cpu_seconds"][name]) == 2

    medians = result["median_seconds"]
    assert medians["capt_epoch"] == pytest.approx(statistics.median(result["epoch_seconds"]["capt"]))
    assert medians["retrieval_batched"] > 0
    assert medians["retrieval_loop"] > 0
    assert result["ratios"]["capt_over_coop"]["ratio"] == pytest.approx(medians["capt_epoch"] / medians["coop_epoch"])
    assert result["ratios"]["recompute_over_cached"]["ratio"] == pytest.approx(
        medians["recompute_epoch"] / medians["capt_epoch"]
    )
    assert result["ratios"]["retrieval_loop_over_batched"]["ratio"] == pytest.approx(
        medians["retrieval_loop"] / medians["retrieval_batched"]
    )
    cpu = result["median_cpu_seconds"]
    assert cpu["recompute"] == pytest.approx(statistics.median(result["epoch_cpu_seconds"]["recompute"]))
    assert result["cpu_ratios"]["recompute_over_cached"] == pytest.approx(cpu["recompute"] / cpu["capt"])

    assert result["retrieval"]["identical"] is True
    assert result["retrieval"]["bank_rows"] == 400
    assert result["hardware"]["torch"] == torch.__version__
    assert result["settings"]["device"] == "cpu"
