"""Tests of the ablation helpers on a tiny random CLIP and a six-class in-memory task."""

import dataclasses
import itertools
import json
import math

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from capt_lib.backbones.base import Backbone
from capt_lib.confusion.bank import ConfusionBank, build_confusion_bank
from capt_lib.data.dataset import ClassificationDataset
from capt_lib.modules.adapter import DiffMannerAdapterConfig
from capt_lib.modules.capt_model import CAPTConfig
from capt_lib.modules.mgde import MGDEConfig
from capt_lib.prompts.semantic import PairPrompts
from capt_lib.runs import ablation, pipeline
from capt_lib.runs.pipeline import FewShotTask
from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors

CLASSNAMES = ("ant", "bee", "cat", "dog", "eel", "fox")
BASE, NOVEL = CLASSNAMES[:3], CLASSNAMES[3:]
VOCAB, CONTEXT, EOT = 100, 8, 99
IMAGE_SIZE = 16

SMALL = CAPTConfig(
    adapter=DiffMannerAdapterConfig(heads=2),
    mgde=MGDEConfig(n_semantic_experts=2, n_sample_experts=1, n_centres=2),
)
IN_BLOCKS = dataclasses.replace(
    SMALL, adapter=DiffMannerAdapterConfig(heads=2, placement="in_blocks", blocks=(-1,))
)
QUICK = CAPTTrainConfig(epochs=2, batch_size=8, seed=3)


def tokenize(texts):
    """Word ids from character sums, then the end-of-text id, which open_clip pools at (the largest id)."""
    ids = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [sum(map(ord, word)) % (EOT - 2) + 1 for word in text.lower().split()][: CONTEXT - 1]
        ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        ids[row, len(words)] = EOT
    return ids


def preprocess(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def tiny_backbone():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=IMAGE_SIZE, patch_size=4, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=1),
    )
    model.eval().requires_grad_(False)
    return Backbone(model, tokenize, preprocess, "tiny", None, "tiny", IMAGE_SIZE, CONTEXT, random_weights=True)


def dataset(split, labels, first_index, seed, classnames=CLASSNAMES):
    """In-memory images whose source indices start at ``first_index`` and run backwards."""
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 256, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    indices = first_index + np.arange(len(labels))[::-1]
    return ClassificationDataset("tiny", split, classnames, np.asarray(labels, dtype=np.int64), indices.copy(), images)


def encode(backbone, data, labels=None):
    images = torch.stack([preprocess(data.load_image(i)) for i in range(len(data))])
    with torch.no_grad():
        tokens = backbone.visual_tokens(images)
        features = F.normalize(backbone.visual_head(tokens), dim=-1)
    labels = data.labels if labels is None else labels
    return SplitTensors(features, torch.as_tensor(labels), torch.as_tensor(data.indices), tokens)


def rows_of(split, rows, labels):
    return SplitTensors(split.features[rows], torch.as_tensor(labels), split.sample_ids[rows], split.tokens[rows])


def tiny_task(backbone):
    """Base classes ant, bee and cat with 4 shots each, novel classes dog, eel and fox, 4 test images per class."""
    train_data = dataset("train", np.repeat(np.arange(3), 4), 500, seed=1, classnames=BASE)
    val_data = dataset("val", np.repeat(np.arange(3), 2), 700, seed=2, classnames=BASE)
    test_data = dataset("test", np.repeat(np.arange(6), 4), 900, seed=3)

    test_all = encode(backbone, test_data)
    base_rows = np.flatnonzero(test_data.labels < 3)
    novel_rows = np.flatnonzero(test_data.labels >= 3)
    return FewShotTask(
        classnames=CLASSNAMES,
        base_classnames=BASE,
        novel_classnames=NOVEL,
        train=encode(backbone, train_data),
        val=encode(backbone, val_data),
        test_base=rows_of(test_all, base_rows, test_data.labels[base_rows]),
        test_novel=rows_of(test_all, novel_rows, test_data.labels[novel_rows] - 3),
        test_all=test_all,
        train_dataset=train_data,
        test_dataset=test_data,
        settings={"dataset": "tiny", "shots": 4, "seed": 1, "backbone": "tiny"},
    ), val_data


def pair_prompts():
    commonality = {(a, b): [f"both {a} and {b} live"] for a, b in itertools.combinations(CLASSNAMES, 2)}
    difference = {(a, b): [f"{a} is not {b}"] for a, b in itertools.permutations(CLASSNAMES, 2)}
    return PairPrompts(CLASSNAMES, commonality, difference, "test prompts")


def base_output(seed=7):
    generator = torch.Generator().manual_seed(seed)
    return {
        "base_text": F.normalize(torch.randn(3, 16, generator=generator), dim=-1),
        "novel_text": F.normalize(torch.randn(3, 16, generator=generator), dim=-1),
    }


def bank_for(backbone, task, output):
    logits = pipeline.logits_from_text(backbone, task.train.features, output["base_text"])
    return build_confusion_bank(logits, task.train.labels, task.train.features, task.train.sample_ids, BASE)


@pytest.fixture(scope="module")
def setup():
    backbone = tiny_backbone()
    task, val_data = tiny_task(backbone)
    output = base_output()
    return backbone, task, val_data, output, bank_for(backbone, task, output), pair_prompts()


def hooks_on(backbone):
    return sum(len(block._forward_hooks) for block in backbone.model.visual.transformer.resblocks)


# ---- images ---------------------------------------------------------------------------------


def test_preprocess_images_follow_sample_ids(setup):
    backbone, task, *_ = setup
    data = task.test_dataset  # source indices run 923 down to 900
    images = ablation.preprocess_images(backbone, data, torch.tensor([900, 923, 910]))

    for row, position in enumerate([23, 0, 13]):  # index 900 + j sits at position 23 - j
        assert torch.equal(images[row], preprocess(data.load_image(position)))


def test_preprocess_images_rejects_unknown_id(setup):
    backbone, task, *_ = setup
    with pytest.raises(ValueError, match="no images with source indices \\[5\\]"):
        ablation.preprocess_images(backbone, task.test_dataset, torch.tensor([900, 5]))


def test_task_images_reproduce_cached_features(setup):
    backbone, task, val_data, *_ = setup
    with_images = ablation.task_with_images(backbone, task, val_dataset=val_data)

    for name in ("train", "val", "test_base", "test_novel"):
        split = getattr(with_images, name)
        with torch.no_grad():
            features = F.normalize(backbone.visual_head(backbone.visual_tokens(split.images)), dim=-1)
        torch.testing.assert_close(features, getattr(task, name).features, atol=1e-6, rtol=1e-5)
    assert with_images.test_all.images is None


# ---- running variants -----------------------------------------------------------------------


def test_variant_matches_pipeline_run_capt(setup):
    backbone, task, _, output, bank, prompts = setup
    expected = pipeline.run_capt(backbone, task, bank, output, prompts, SMALL, QUICK)
    result = ablation.run_capt_variant(backbone, task, bank, output, prompts, SMALL, QUICK)

    assert result["metrics"] == expected["metrics"]
    assert torch.equal(result["base_logits"], expected["base_logits"])
    assert torch.equal(result["novel_logits"], expected["novel_logits"])
    assert result["best_epoch"] == expected["best_epoch"]


def test_in_block_zero_lr_is_base_model(setup):
    backbone, task, val_data, output, bank, prompts = setup
    with_images = ablation.task_with_images(backbone, task, val_dataset=val_data)
    frozen = dataclasses.replace(QUICK, lr=0.0, weight_decay=0.0)

    result = ablation.run_capt_variant(backbone, with_images, bank, output, prompts, IN_BLOCKS, frozen)

    base = pipeline.logits_from_text(backbone, task.test_base.features, output["base_text"])
    novel = pipeline.logits_from_text(backbone, task.test_novel.features, output["novel_text"])
    torch.testing.assert_close(result["base_logits"], base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result["novel_logits"], novel, atol=1e-4, rtol=1e-4)
    assert hooks_on(backbone) == 0


def test_in_block_hooks_removed_after_error(setup, monkeypatch):
    backbone, task, val_data, output, bank, prompts = setup
    with_images = ablation.task_with_images(backbone, task, val_dataset=val_data)

    def failing_train(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(pipeline, "train_capt", failing_train)
    with pytest.raises(RuntimeError, match="training failed"):
        ablation.run_capt_variant(backbone, with_images, bank, output, prompts, IN_BLOCKS, QUICK)
    assert hooks_on(backbone) == 0


def test_in_block_variant_without_images_raises(setup):
    backbone, task, _, output, bank, prompts = setup
    with pytest.raises(ValueError, match="task_with_images"):
        ablation.run_capt_variant(backbone, task, bank, output, prompts, IN_BLOCKS, QUICK)


def test_run_variants_rows_match_single_runs(setup):
    backbone, task, _, output, bank, prompts = setup
    no_mgde = dataclasses.replace(SMALL, use_mgde=False)
    variants = {"full": SMALL, "no MGDE": no_mgde}
    runs = ablation.run_variants(
        backbone, {1: task, 2: task}, {1: output, 2: output}, {1: bank, 2: bank}, prompts, variants, QUICK, [1, 2],
        keep_models=[("full", 2)],
    )

    order = list(zip(runs.per_seed["variant"], runs.per_seed["seed"]))
    assert order == [("full", 1), ("no MGDE", 1), ("full", 2), ("no MGDE", 2)]
    seed_2 = dataclasses.replace(QUICK, seed=2)
    single = ablation.run_capt_variant(backbone, task, bank, output, prompts, no_mgde, seed_2)
    row = runs.per_seed.iloc[3]
    for key in ablation.RUN_METRICS:
        assert row[key] == single["metrics"][key] or (math.isnan(row[key]) and math.isnan(single["metrics"][key]))
    assert "model" in runs.outputs[("full", 2)]
    assert "model" not in runs.outputs[("full", 1)]
    assert list(runs.summary.index) == ["full", "no MGDE"]


def test_run_variants_names_missing_seed(setup):
    backbone, task, _, output, bank, prompts = setup
    with pytest.raises(ValueError, match="banks has no entry for seed\\(s\\) \\[2\\]"):
        ablation.run_variants(
            backbone, {1: task, 2: task}, {1: output, 2: output}, {1: bank}, prompts, {"a": SMALL}, QUICK, [1, 2]
        )


# ---- summaries and sentences ----------------------------------------------------------------


def test_summarise_variants_by_hand():
    per_seed = pd.DataFrame(
        {
            "variant": ["b", "a", "a"],
            "seed": [1, 1, 2],
            "base_accuracy": [50.0, 60.0, 70.0],
            "novel_accuracy": [50.0, 40.0, 50.0],
            "hm": [50.0, 48.0, 58.0],
            "pair_resolution_rate": [10.0, float("nan"), 30.0],
            "newly_wrong": [1, 2, 4],
        }
    )
    summary = ablation.summarise_variants(per_seed)

    assert list(summary.index) == ["b", "a"]
    a = summary.loc["a"]
    assert a["base_accuracy_mean"] == 65.0
    assert a["base_accuracy_std"] == pytest.approx(math.sqrt(50.0))
    assert a["hm_of_means"] == pytest.approx(2 * 65 * 45 / 110)
    assert a["pair_resolution_rate_mean"] == 30.0  # the NaN seed is skipped
    assert a["pair_resolution_rate_std"] == 0.0
    assert a["seeds"] == 2
    assert summary.loc["b", "hm_std"] == 0.0


def test_summarise_variants_rejects_missing_column():
    with pytest.raises(ValueError, match="lacks the column\\(s\\) \\['hm'"):
        ablation.summarise_variants(pd.DataFrame({"variant": ["a"], "seed": [1]}), metrics=("hm",))


@pytest.mark.parametrize(
    "mean, std, other_mean, other_std, verdict",
    [
        (70.0, 1.0, 68.0, 0.5, "higher by 2.00 points, more than one standard deviation"),
        (66.0, 1.0, 68.0, 0.5, "lower by 2.00 points, more than one standard deviation"),
        (70.0, 3.0, 68.0, 1.0, "within one standard deviation (+2.00 points)"),
        (68.0, 0.0, 68.5, 0.5, "within one standard deviation (-0.50 points)"),
    ],
)
def test_compare_means_verdicts(mean, std, other_mean, other_std, verdict):
    sentence = ablation.compare_means("CAPT", mean, std, "CoOp", other_mean, other_std)
    numbers = f"{mean:.2f} ± {std:.2f} against {other_mean:.2f} ± {other_std:.2f}"
    expected = f"The HM of CAPT is {numbers} for CoOp: {verdict}."
    assert sentence == expected


def test_compare_variants_skips_reference():
    index = pd.Index(["full", "none"], name="variant")
    summary = pd.DataFrame({"hm_mean": [60.0, 50.0], "hm_std": [1.0, 1.0]}, index=index)
    assert ablation.compare_variants(summary, "full") == [
        "The HM of 'none' is 50.00 ± 1.00 against 60.00 ± 1.00 for 'full': "
        "lower by 10.00 points, more than one standard deviation."
    ]
    with pytest.raises(ValueError, match="reference 'other' is not a variant"):
        ablation.compare_variants(summary, "other")


# ---- what the modules see -------------------------------------------------------------------


def test_sem_pairs_table_by_hand():
    probs = torch.tensor([[0.6, 0.25, 0.15]])
    counts = torch.tensor([[0, 0, 4], [1, 0, 0], [0, 0, 0]])  # both directions: n[0,1] = 1, n[0,2] = 4
    table = ablation.sem_pairs_table(probs, counts, ("a", "b", "c"), k=2, true_labels=torch.tensor([2]))

    assert list(table["partner"]) == ["b", "c"]  # S_b = 1.2 * 0.25 = 0.30 > S_c = 1.8 * 0.15 = 0.27
    assert list(table["true"]) == ["c", "c"]
    assert list(table["pseudo_label"]) == ["a", "a"]
    np.testing.assert_allclose(table["count_share"], [0.2, 0.8])
    np.testing.assert_allclose(table["score"], [0.30, 0.27], rtol=1e-6)
    np.testing.assert_allclose(table["intensity"], [0.65, 0.65], rtol=1e-6)


def test_sem_pairs_table_without_bank_ranks_by_probability():
    probs = torch.tensor([[0.1, 0.2, 0.7]])
    table = ablation.sem_pairs_table(probs, None, ("a", "b", "c"), k=2)
    assert list(table["partner"]) == ["b", "a"]
    np.testing.assert_allclose(table["score"], [0.2, 0.1], rtol=1e-6)


def hand_bank():
    """Rows: 0 ant->bee, 1 bee->ant, 2 ant->bee, 3 cat correct, 4 ant correct."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8], [1.0, 0.0]])
    probs = torch.tensor(
        [[0.3, 0.6, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]
    )
    return ConfusionBank.from_predictions(
        torch.tensor([0, 1, 0, 2, 0]), probs, features, torch.tensor([10, 11, 12, 13, 14]), ("ant", "bee", "cat")
    )


def test_sam_retrievals_hand_bank():
    table = ablation.sam_retrievals(hand_bank(), [0], k=1)
    representative = table[table["mode"] == "representative"].iloc[0]
    random = table[table["mode"] == "random"].iloc[0]

    assert representative["partner"] == 0  # pseudo label bee, partner ant
    assert representative["candidates"] == 2  # rows 1 and 2, because row 0 is the query itself
    assert representative["retrieved_row"] == 2  # cos 0.8 beats cos 0.0 of row 1
    assert representative["cosine"] == pytest.approx(0.8)
    assert random["retrieved_row"] in (1, 2)


def test_sam_retrievals_rejects_bad_row():
    with pytest.raises(ValueError, match="rows must lie in \\[0, 5\\)"):
        ablation.sam_retrievals(hand_bank(), [5], k=1)


def test_expert_usage_matches_slow_loop(setup):
    backbone, task, _, output, bank, prompts = setup
    result = ablation.run_capt_variant(backbone, task, bank, output, prompts, SMALL, QUICK, keep_models=True)
    model = result["model"]
    usage = ablation.expert_usage(model, task.test_base, batch_size=5)

    model.eval()
    with torch.no_grad():
        probs = model(task.test_base.features, tokens=task.test_base.tokens).router_probs
    weights = torch.zeros_like(probs)
    for row in range(len(probs)):
        top = torch.argsort(probs[row], descending=True, stable=True)[: model.mgde.top_k]
        weights[row, top] = probs[row, top] / probs[row, top].sum()

    assert list(usage.index) == ["semantic0", "semantic1", "sample0"]
    np.testing.assert_allclose(usage["router_prob"], probs.mean(dim=0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(usage["router_weight"], weights.mean(dim=0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(usage["routed_share"], (weights > 0).float().mean(dim=0).numpy(), rtol=1e-5)


def test_expert_usage_rejects_model_without_mgde(setup):
    backbone, task, _, output, bank, prompts = setup
    config = dataclasses.replace(SMALL, use_mgde=False)
    model = ablation.run_capt_variant(backbone, task, bank, output, prompts, config, QUICK, keep_models=True)["model"]
    with pytest.raises(ValueError, match="has no MGDE experts"):
        ablation.expert_usage(model, task.test_base)


def test_partner_recall_by_hand():
    probs = torch.tensor(
        [
            [0.5, 0.3, 0.2],  # true 2, wrong: probability ranks b first, the counts lift c
            [0.6, 0.1, 0.3],  # true 1, wrong: b is last by probability and without counts
            [0.2, 0.7, 0.1],  # true 1, right: not counted
        ]
    )
    labels = torch.tensor([2, 1, 1])
    counts = torch.tensor([[0, 0, 6], [0, 0, 0], [0, 0, 0]])  # n[0,2] = 6 in both directions, n[0,1] = 0

    assert ablation.partner_recall(probs, labels, None, k=1) == 0.0
    assert ablation.partner_recall(probs, labels, counts, k=1) == 50.0  # S_c = 2 * 0.2 = 0.4 > S_b = 0.3
    assert ablation.partner_recall(probs, labels, None, k=2) == 100.0
    assert math.isnan(ablation.partner_recall(probs[2:], labels[2:], counts, k=1))


def test_prepare_inputs_zero_shot(setup, monkeypatch):
    backbone, task, _, _, _, prompts = setup
    monkeypatch.setattr(pipeline, "prepare_task", lambda backbone, dataset, shots, seed, data_root=None: task)
    monkeypatch.setattr(ablation, "load_builtin_prompts", lambda name, tokenizer=None: prompts)
    monkeypatch.setattr(pipeline, "load_or_build_bank", lambda key_inputs, build, cache_dir=None: build())

    inputs = ablation.prepare_inputs(backbone, "tiny", 4, [2, 1, 2], ["a photo of a {}."])

    assert list(inputs.tasks) == [2, 1]
    assert inputs.coop == {}
    expected_text = pipeline.zero_shot_text_features(backbone, BASE, ["a photo of a {}."])
    torch.testing.assert_close(inputs.base_outputs[1]["base_text"], expected_text)
    logits = pipeline.logits_from_text(backbone, task.train.features, expected_text)
    assert torch.equal(inputs.banks[2].pseudo_labels, logits.argmax(dim=1))
    assert inputs.prompts is prompts


def test_prepare_inputs_rejects_unknown_base_model(setup):
    backbone = setup[0]
    with pytest.raises(ValueError, match="base_model='clip' is invalid"):
        ablation.prepare_inputs(backbone, "tiny", 4, [1], ["{}"], base_model="clip")


def test_plot_variant_summary_draws_each_mean():
    summary = pd.DataFrame(
        {
            "hm_mean": [60.0, 50.0],
            "hm_std": [1.0, 2.0],
            "base_accuracy_mean": [70.0, 65.0],
            "base_accuracy_std": [0.5, 0.5],
        },
        index=pd.Index(["full", "none"], name="variant"),
    )
    fig = ablation.plot_variant_summary(summary, ("base_accuracy", "hm"))
    ax = fig.axes[0]

    widths = sorted(round(patch.get_width(), 6) for patch in ax.patches)
    assert widths == [50.0, 60.0, 65.0, 70.0]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["full", "none"]
    assert ax.get_xlabel() == "Accuracy (%), mean over seeds ± std"


def test_summarise_by_other_column():
    per_seed = pd.DataFrame({"method": ["x", "x"], "seed": [1, 2], "hm": [40.0, 44.0]})
    summary = ablation.summarise_variants(per_seed, metrics=("hm",), by="method")
    assert summary.loc["x", "hm_mean"] == 42.0
    assert summary.loc["x", "hm_std"] == pytest.approx(math.sqrt(8.0))
    assert "hm_of_means" not in summary.columns


def test_write_results_round_trip(tmp_path):
    summary = pd.DataFrame({"hm_mean": [60.0]}, index=pd.Index(["full"], name="variant"))
    per_seed = pd.DataFrame({"variant": ["full"], "seed": [1], "hm": [60.0]})
    path = ablation.write_results(
        tmp_path / "out", {"seeds": [1]}, {"hm": 60.0}, {"summary": summary, "per_seed": per_seed}, wall_seconds=2.5
    )

    results = json.loads(path.read_text())
    assert results["settings"] == {"seeds": [1]}
    assert results["metrics"] == {"hm": 60.0}
    assert results["tables"]["summary"] == [{"variant": "full", "hm_mean": 60.0}]
    assert results["wall_seconds"] == 2.5
    per_seed_csv = pd.read_csv(tmp_path / "out" / "per_seed.csv")
    assert per_seed_csv.to_dict(orient="records") == [{"variant": "full", "seed": 1, "hm": 60.0}]
    assert list(pd.read_csv(tmp_path / "out" / "summary.csv").columns) == ["variant", "hm_mean"]
