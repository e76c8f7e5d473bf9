"""The experiment steps every notebook runs: a few-shot task, its baselines, the bank, CAPT.

Notebooks stay thin: they choose settings, call these functions and show the results.
Each function takes explicit arguments (no notebook globals) and returns plain data:
metrics as floats in percent, predictions as tensors.

Protocol (base-to-novel, as in the CoOp family): few-shot images are sampled per class
from the training split over all classes, then the first ceil(n/2) classes are base and
the rest novel, each half relabelled from 0. Training and the Confusion Bank use the base
few-shot split only. Validation uses min(shots, 4) images per base class from the
validation split, and base and novel accuracy come from the test split.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capt_lib.backbones.base import Backbone
from capt_lib.backbones.features import encode_dataset
from capt_lib.backbones.loading import BackboneConfig, load_backbone
from capt_lib.confusion.bank import ConfusionBank, build_confusion_bank, load_or_build_bank
from capt_lib.confusion.semantic_miner import encode_pair_prompts
from capt_lib.data.dataset import ClassificationDataset
from capt_lib.data.fewshot import sample_few_shot
from capt_lib.data.registry import load_dataset
from capt_lib.data.splits import split_base_novel
from capt_lib.evaluation.linear_probe import fit_linear_probe, predict_linear_probe
from capt_lib.evaluation.metrics import accuracy, harmonic_mean, pair_resolution
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.prompts.coop import CoOpModel, PromptLearner
from capt_lib.prompts.semantic import PairPrompts
from capt_lib.prompts.zero_shot import build_text_classifier
from capt_lib.training.capt_trainer import (
    CAPTTrainConfig,
    SplitTensors,
    predict_logits,
    rows_of_sample_ids,
    train_capt,
)
from capt_lib.training.coop_trainer import CoOpConfig, train_coop

logger = logging.getLogger(__name__)

BASE_MODELS = ("zero_shot", "coop")


def load_backbone_by_name(
    backbone: str,
    pretrained: str | None,
    checkpoint: str | None = None,
    *,
    pretrain_seed: int = 0,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Load a backbone from notebook-style settings.

    For ``backbone="MiniCLIP"``, ``pretrained`` names the MiniCLIP recipe and
    ``pretrain_seed`` its pretraining seed. For other backbones ``pretrained`` is an
    open_clip tag such as ``"openai"``, and ``checkpoint`` an optional local weights file.
    """
    cache = None if cache_dir is None else str(cache_dir)
    if backbone == "MiniCLIP":
        config = BackboneConfig("MiniCLIP", miniclip_recipe=pretrained or "default", miniclip_seed=pretrain_seed, cache_dir=cache)
    else:
        config = BackboneConfig(backbone, pretrained=None if checkpoint else pretrained, checkpoint=checkpoint, cache_dir=cache)
    return load_backbone(config, device=device)


@dataclass
class FewShotTask:
    """A base-to-novel few-shot task with the frozen backbone's cached outputs."""

    classnames: tuple[str, ...]  # all classes, in label order
    base_classnames: tuple[str, ...]  # the first ceil(n/2) classes
    novel_classnames: tuple[str, ...]  # the other classes
    train: SplitTensors  # few-shot training images of the base classes, relabelled from 0
    val: SplitTensors  # min(shots, 4) validation images per base class
    test_base: SplitTensors  # test images of the base classes, relabelled from 0
    test_novel: SplitTensors  # test images of the novel classes, relabelled from 0
    test_all: SplitTensors  # every test image with its original label
    train_dataset: ClassificationDataset  # the images behind ``train``, for figures
    test_dataset: ClassificationDataset  # the images behind ``test_all``
    settings: dict  # what the task was built from


def prepare_task(
    backbone: Backbone,
    dataset: str = "fashion_mnist",
    shots: int = 16,
    seed: int = 1,
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    with_tokens: bool = True,
) -> FewShotTask:
    """Sample the few-shot splits and encode them with the frozen backbone (cached)."""
    train_pool = load_dataset(dataset, "train", data_root)
    val_pool = load_dataset(dataset, "val", data_root)
    test = load_dataset(dataset, "test", data_root)

    train_few = sample_few_shot(train_pool, shots, seed)
    val_few = sample_few_shot(val_pool, min(shots, 4) if shots > 0 else 0, seed)
    train_base, val_base = split_base_novel(train_few, val_few, part="base")
    test_base, test_novel = (split_base_novel(train_few, test, part=part)[1] for part in ("base", "novel"))

    encode = dict(backbone=backbone, cache_dir=cache_dir, with_tokens=with_tokens)
    test_all = _split_tensors(encode_dataset(dataset=test, **encode))
    return FewShotTask(
        classnames=test.classnames,
        base_classnames=train_base.classnames,
        novel_classnames=test_novel.classnames,
        train=_split_tensors(encode_dataset(dataset=train_base, **encode), train_base.labels),
        val=_split_tensors(encode_dataset(dataset=val_base, **encode), val_base.labels),
        test_base=_rows_of(test_all, test_base),
        test_novel=_rows_of(test_all, test_novel),
        test_all=test_all,
        train_dataset=train_base,
        test_dataset=test,
        settings={"dataset": dataset, "shots": shots, "seed": seed, "backbone": backbone.key},
    )


def _split_tensors(feature_set, labels=None) -> SplitTensors:
    return SplitTensors(
        features=feature_set.features,
        labels=feature_set.labels if labels is None else torch.as_tensor(labels, dtype=torch.long),
        sample_ids=feature_set.indices,
        tokens=feature_set.tokens,
    )


def _rows_of(full: SplitTensors, subset: ClassificationDataset) -> SplitTensors:
    """Select the rows of ``full`` (the whole test split) that contain ``subset``'s images, with its labels."""
    rows = rows_of_sample_ids(
        full.sample_ids,
        torch.as_tensor(subset.indices, dtype=full.sample_ids.dtype),
        f"{subset.name}/{subset.split} contains images that the encoded test split lacks",
    )
    return SplitTensors(
        features=full.features[rows],
        labels=torch.as_tensor(subset.labels, dtype=torch.long),
        sample_ids=full.sample_ids[rows],
        tokens=None if full.tokens is None else full.tokens[rows],
    )


# ---- baselines ---------------------------------------------------------------------------


def logits_from_text(backbone: Backbone, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP logits (N, C) of image features against class text features."""
    scale = backbone.model.logit_scale.detach().exp().float()
    return scale * F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def evaluate_text_classifier(backbone: Backbone, task: FewShotTask, base_text: torch.Tensor, novel_text: torch.Tensor) -> dict:
    """Base, novel and HM accuracy (percent) of a classifier given by its class text features."""
    base = accuracy(logits_from_text(backbone, task.test_base.features, base_text), task.test_base.labels)
    novel = accuracy(logits_from_text(backbone, task.test_novel.features, novel_text), task.test_novel.labels)
    return {"base_accuracy": base, "novel_accuracy": novel, "hm": harmonic_mean(base, novel)}


def zero_shot_text_features(backbone: Backbone, classnames, templates) -> torch.Tensor:
    return build_text_classifier(backbone, list(classnames), list(templates))


def run_zero_shot(backbone: Backbone, task: FewShotTask, templates) -> dict:
    """Zero-shot CLIP: base/novel/HM and the 10-way accuracy over all classes."""
    base_text = zero_shot_text_features(backbone, task.base_classnames, templates)
    novel_text = zero_shot_text_features(backbone, task.novel_classnames, templates)
    all_text = zero_shot_text_features(backbone, task.classnames, templates)

    metrics = evaluate_text_classifier(backbone, task, base_text, novel_text)
    all_logits = logits_from_text(backbone, task.test_all.features, all_text)
    metrics["all_accuracy"] = accuracy(all_logits, task.test_all.labels)
    return {"metrics": metrics, "base_text": base_text, "novel_text": novel_text, "all_logits": all_logits}


def coop_text_features(backbone: Backbone, trained: CoOpModel, classnames, config: CoOpConfig) -> torch.Tensor:
    """Text features of ``classnames`` under a trained CoOp context (shared ctx transfers to new classes)."""
    if config.csc:
        raise ValueError("class-specific context (csc=True) cannot transfer to other classes; use csc=False")
    learner = PromptLearner(
        backbone,
        tuple(classnames),
        n_ctx=config.n_ctx,
        ctx_init=config.ctx_init,
        class_token_position=config.class_token_position,
        csc=config.csc,
        seed=config.seed,
    )
    with torch.no_grad():
        learner.ctx.copy_(trained.prompt_learner.ctx)
        return CoOpModel(backbone, learner).to(backbone.device).text_features()


def run_coop(backbone: Backbone, task: FewShotTask, config: CoOpConfig) -> dict:
    """CoOp trained on the base few-shot split and tested on base and novel.

    Validation accuracy is logged per epoch; ``config.final_model`` selects the epoch that is kept.
    """
    model, history = train_coop(
        backbone,
        task.train.features,
        task.train.labels,
        task.base_classnames,
        config,
        val_features=task.val.features,
        val_labels=task.val.labels,
    )
    with torch.no_grad():
        base_text = model.text_features()
    novel_text = coop_text_features(backbone, model, task.novel_classnames, config)
    metrics = evaluate_text_classifier(backbone, task, base_text, novel_text)
    return {"metrics": metrics, "base_text": base_text, "novel_text": novel_text, "history": history}


def run_linear_probe(task: FewShotTask, seed: int = 0) -> dict:
    """Fit a logistic-regression probe on the base few-shot features and return its base accuracy.

    The probe uses no text, so it has no novel-class accuracy.
    """
    probe = fit_linear_probe(task.train.features, task.train.labels, len(task.base_classnames), seed=seed)
    predictions = predict_linear_probe(probe, task.test_base.features)
    return {"metrics": {"base_accuracy": accuracy(predictions, task.test_base.labels)}}


# ---- Confusion Bank ----------------------------------------------------------------------


def build_bank(
    backbone: Backbone,
    task: FewShotTask,
    base_text: torch.Tensor,
    base_model: dict,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> ConfusionBank:
    """Stage 1: the base model's predictions over the base few-shot training split, cached.

    ``base_model`` describes the base model completely (its kind and settings); it is part
    of the cache key together with the backbone and the training split.
    """
    return build_bank_for_split(
        backbone, task.train, task.base_classnames, base_text, base_model, task.settings, cache_dir=cache_dir
    )


def build_bank_for_split(
    backbone: Backbone,
    train: SplitTensors,
    classnames,
    base_text: torch.Tensor,
    base_model: dict,
    task_settings: dict,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> ConfusionBank:
    """Build (or load) the Confusion Bank of a training split scored by ``base_text``.

    The cache key names the backbone, the base model, the training images and the task
    settings, so a change to any of them builds a new bank.
    """
    key_inputs = {
        "backbone": backbone.key,
        "base_model": base_model,
        "train_sample_ids": train.sample_ids.tolist(),
        "task": task_settings,
    }

    def build() -> ConfusionBank:
        logits = logits_from_text(backbone, train.features, base_text)
        return build_confusion_bank(
            logits,
            train.labels,
            train.features,
            train.sample_ids,
            tuple(classnames),
            meta={"backbone": backbone.key, "base_model": base_model, "task": task_settings},
        )

    return load_or_build_bank(key_inputs, build, cache_dir=cache_dir)


# ---- CAPT --------------------------------------------------------------------------------


def encode_prompts_for(backbone: Backbone, prompts: PairPrompts, classnames) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, C, E) commonality and difference features of ``classnames``'s pair prompts."""
    return encode_pair_prompts(lambda texts: backbone.encode_text(texts), prompts, tuple(classnames))


def run_capt(
    backbone: Backbone,
    task: FewShotTask,
    bank: ConfusionBank,
    base_output: dict,
    prompts: PairPrompts,
    capt_config: CAPTConfig = CAPTConfig(),
    train_config: CAPTTrainConfig = CAPTTrainConfig(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    keep_models: bool = False,
) -> dict:
    """Stage 2: train CAPT on the base split, then evaluate on base and novel classes.

    ``base_output`` is the base model's result (``run_zero_shot`` or ``run_coop``): its
    class text features feed SEM and the final classifier. The novel model shares every
    trained weight. Its SEM has no bank counts, because the bank records base classes only,
    and SAM is never used at test time. With ``keep_models`` the result also contains the trained
    base-class and novel-class models under ``"model"`` and ``"novel_model"``; in-block
    adapters are detached from the ViT by then, so those two can no longer classify images.
    """
    common_base, diff_base = encode_prompts_for(backbone, prompts, task.base_classnames)
    common_novel, diff_novel = encode_prompts_for(backbone, prompts, task.novel_classnames)

    torch.manual_seed(train_config.seed)
    model = CAPTModel(backbone, base_output["base_text"], bank, common_base, diff_base, capt_config).to(backbone.device)
    try:
        result = train_capt(model, task.train, task.val, train_config, checkpoint_dir=checkpoint_dir)
        base_logits = predict_logits(model, task.test_base)
    finally:
        _detach_hooks(model)  # in-block adapters hook the shared ViT; the novel model adds its own
    trained_state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(train_config.seed)
    novel_model = CAPTModel(backbone, base_output["novel_text"], None, common_novel, diff_novel, capt_config)
    novel_model = novel_model.to(backbone.device)
    try:
        novel_model.load_state_dict(trained_state, strict=False)
        novel_logits = predict_logits(novel_model, task.test_novel)
    finally:
        _detach_hooks(novel_model)

    base = accuracy(base_logits, task.test_base.labels)
    novel = accuracy(novel_logits, task.test_novel.labels)
    metrics = {"base_accuracy": base, "novel_accuracy": novel, "hm": harmonic_mean(base, novel)}
    metrics.update(pair_metrics(backbone, task, bank, base_output, base_logits))
    output = {
        "metrics": metrics,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "base_logits": base_logits,
        "novel_logits": novel_logits,
    }
    if keep_models:
        output.update(model=model, novel_model=novel_model)
    return output


def _detach_hooks(model: CAPTModel) -> None:
    if model.adapter_hooks is not None:
        model.adapter_hooks.remove()


def pair_metrics(backbone: Backbone, task: FewShotTask, bank: ConfusionBank, base_output: dict, tuned_logits) -> dict:
    """Compute the pair resolution rate on base test images, over every confusion pair the bank recorded."""
    base_logits = logits_from_text(backbone, task.test_base.features, base_output["base_text"])
    return bank_pair_metrics(bank, base_logits, tuned_logits, task.test_base.labels)


def bank_pair_metrics(bank: ConfusionBank, base_logits: torch.Tensor, tuned_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Compute pair resolution of ``tuned_logits`` against ``base_logits``, over the bank's pairs in both directions."""
    pairs = [(a, b) for a, b, _ in bank.top_pairs(symmetric=True)]
    result = pair_resolution(
        base_logits.argmax(1).cpu().numpy(),
        tuned_logits.argmax(1).cpu().numpy(),
        labels.cpu().numpy(),
        pairs,
        symmetric=True,
    )
    keys = ("pair_resolution_rate", "base_errors_in_pairs", "resolved", "newly_wrong", "newly_right")
    return {key: result[key] for key in keys}


def capt_config_with(config: CAPTConfig, **changes) -> CAPTConfig:
    """Return ``config`` with nested changes such as ``sem__k=3`` or ``adapter__alpha_mode="fixed"``."""
    top: dict = {}
    nested: dict[str, dict] = {}
    for name, value in changes.items():
        if "__" in name:
            part, field_name = name.split("__", 1)
            nested.setdefault(part, {})[field_name] = value
        else:
            top[name] = value
    for part, fields in nested.items():
        top[part] = dataclasses.replace(getattr(config, part), **fields)
    return dataclasses.replace(config, **top)


def summarise_seeds(rows: list[dict], keys=("base_accuracy", "novel_accuracy", "hm")) -> dict:
    """Mean and sample standard deviation over seeds; HM of the mean base and mean novel accuracy."""
    summary = {}
    for key in keys:
        values = np.array([row[key] for row in rows], dtype=float)
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    if "base_accuracy" in keys and "novel_accuracy" in keys:
        summary["hm_of_means"] = harmonic_mean(summary["base_accuracy_mean"], summary["novel_accuracy_mean"])
    return summary


def output_path(output_dir: str | os.PathLike, *parts: str) -> Path:
    path = Path(output_dir).joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
