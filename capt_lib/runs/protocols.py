"""The four benchmark protocols of CAPT's evaluation, one (dataset, seed) per call, and their tables.

The protocols (configs/presets/<protocol>.yaml contains their settings and sources):

- ``base_to_novel``: train on the first ceil(n/2) classes, test the base and the novel
  classes separately (``pipeline.prepare_task``);
- ``cross_dataset``: train on all classes of a source dataset, then test the trained
  model without further training on the full test splits of target datasets;
- ``domain_generalization``: the same steps, with targets that share the source's
  classes in another domain (ImageNet -> ImageNet-V2, -Sketch, -A, -R);
- ``few_shot``: train on all classes with 1, 2, 4, 8 or 16 shots, test on all classes.

A run starts from ``resolve_protocol_settings``, which merges the protocol preset with
the ``capt`` and ``coop`` method presets (``capt_lib.runs.presets``). Every later step
reads those settings only, and the notebook stores them in results.json.

Offline, the transfer protocols train on ``fashion_mnist`` (all 10 classes, downstream
style) and test on Fashion-MNIST in the other image styles (``OFFLINE_TARGETS``, see
``capt_lib.data.registry``). That proxy changes the domain only: its targets keep the
source's ten classes, which the real cross-dataset targets do not.

Metric names in results.json follow ``capt_lib.evaluation.tables``. CAPT's numbers take
the plain names and each baseline's numbers take the same names behind a prefix
(``METRIC_PREFIXES``):

- base-to-novel: ``base_accuracy``, ``novel_accuracy``, ``hm``, and CAPT's pair metrics;
- all-class protocols: ``accuracy`` on the dataset trained on, and CAPT's pair metrics;
- transfer protocols, also: ``target_accuracy`` = {target dataset: accuracy}.

So ``coop_novel_accuracy`` is CoOp's novel accuracy and ``zero_shot_target_accuracy``
zero-shot CLIP's per-target accuracies. ``method_runs`` strips a method's prefix, so the
table builders of ``capt_lib.evaluation.tables`` summarise any method.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from capt_lib.backbones.base import Backbone
from capt_lib.backbones.features import encode_dataset
from capt_lib.backbones.loading import MINICLIP_NAME, BackboneConfig, load_backbone
from capt_lib.confusion.bank import ConfusionBank
from capt_lib.data.dataset import ClassificationDataset
from capt_lib.data.fewshot import sample_few_shot
from capt_lib.data.manifest import load_manifest
from capt_lib.data.registry import FASHION_MNIST_STYLE_DATASETS, load_dataset
from capt_lib.data.styles import DOWNSTREAM_STYLE, STYLES
from capt_lib.evaluation.metrics import accuracy
from capt_lib.evaluation.paper_results import (
    AVERAGE,
    BASE_TO_NOVEL_DATASETS,
    CROSS_DATASET_SOURCE,
    CROSS_DATASET_TARGETS,
    DOMAIN_GENERALIZATION_TARGETS,
    paper_base_to_novel,
    published_methods,
)
from capt_lib.evaluation.tables import (
    IGNORED_SETTINGS,
    RUN_COLUMNS,
    STATUS_COMPLETE,
    base_to_novel_table,
    collect_results,
    compare_with_paper,
    cross_dataset_table,
    domain_generalization_table,
    few_shot_table,
    flatten_metrics,
    to_markdown,
)
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.prompts.semantic import (
    PairPrompts,
    load_builtin_prompts,
    load_semantic_prompts,
    pair_prompts_from_class_descriptions,
)
from capt_lib.prompts.templates import FASHION_MNIST_TEMPLATES
from capt_lib.runs import pipeline
from capt_lib.runs.papermill_runner import RUN_RECORD_FILE
from capt_lib.runs.presets import load_preset, resolve_run_settings
from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors, predict_logits, train_capt
from capt_lib.training.coop_trainer import CoOpConfig, train_coop
from capt_lib.utils.io import atomic_write_text, read_json

logger = logging.getLogger(__name__)

PROTOCOLS = ("base_to_novel", "cross_dataset", "domain_generalization", "few_shot")
TRANSFER_PROTOCOLS = ("cross_dataset", "domain_generalization")
METHODS = ("zero_shot", "coop", "capt")
METRIC_PREFIXES = {"capt": "", "coop": "coop_", "zero_shot": "zero_shot_"}
METHOD_TITLES = {"zero_shot": "zero-shot CLIP", "coop": "CoOp", "capt": "CAPT"}
FASHION_MNIST_DATASETS = ("fashion_mnist", *FASHION_MNIST_STYLE_DATASETS)

# The offline transfer targets: the Fashion-MNIST test split in every style except the
# downstream one. MiniCLIP's pretraining shows "plain", "negative", "blur" and
# "upside_down" images and never "noisy" ones (MiniCLIPRecipe.styles).
OFFLINE_TARGETS = tuple(f"fashion_mnist_{style}" for style in STYLES if style != DOWNSTREAM_STYLE)
PAPER_TRANSFER = {  # protocol -> (dataset trained on, targets) of CAPT's evaluation
    "cross_dataset": (CROSS_DATASET_SOURCE, CROSS_DATASET_TARGETS),
    "domain_generalization": (CROSS_DATASET_SOURCE, DOMAIN_GENERALIZATION_TARGETS),
}
TRANSFER_TABLES = {"cross_dataset": cross_dataset_table, "domain_generalization": domain_generalization_table}

# The CoOp seed follows the run's seed, like CAPT's train.seed, so runs of different seeds differ in it.
PROTOCOL_IGNORED_SETTINGS = (*IGNORED_SETTINGS, "coop.train.seed")
RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS"
PAPER_SOURCE_LABEL = "CAPT paper, Table 1"
OURS_SOURCE_LABEL = "these runs"


# ---- settings ---------------------------------------------------------------------------


def backbone_overrides(
    backbone: str,
    pretrained: str | None,
    checkpoint: str | None = None,
    *,
    pretrain_seed: int = 0,
    precision: str | None = None,
) -> dict:
    """Return the ``backbone`` section that selects a backbone named as the notebooks name it.

    For ``backbone="MiniCLIP"``, ``pretrained`` is the MiniCLIP recipe and
    ``pretrain_seed`` its seed. For any other architecture, ``pretrained`` is an open_clip
    tag and ``checkpoint`` a local weights file, which wins over the tag. ``precision``
    None keeps the preset's autocast dtype.
    """
    if backbone == MINICLIP_NAME:
        section = {
            "model_name": backbone,
            "pretrained": None,
            "checkpoint": None,
            "miniclip_recipe": pretrained or "default",
            "miniclip_seed": int(pretrain_seed),
        }
    else:
        section = {"model_name": backbone, "pretrained": None if checkpoint else pretrained, "checkpoint": checkpoint}
    if precision is not None:
        section["precision"] = precision
    return section


def resolve_protocol_settings(
    protocol: str,
    dataset: str,
    seed: int,
    *,
    shots: int | None = None,
    methods: Sequence[str] = METHODS,
    targets: Sequence[str] | None = None,
    backbone: Mapping[str, Any] | None = None,
    capt: Mapping[str, Any] | None = None,
    coop: Mapping[str, Any] | None = None,
    prompt_file: str | os.PathLike | None = None,
    target_prompt_files: Mapping[str, str | os.PathLike] | None = None,
    capt_preset: str = "capt",
    directory: str | os.PathLike | None = None,
) -> dict:
    """Return the full settings of one protocol run, from the presets and the overrides.

    The result is ``resolve_run_settings(protocol, capt_preset, ...)`` (the protocol, the
    CAPT method preset and its backbone, bank, model and train sections, the provenance)
    plus:

    - ``methods``: the methods the run evaluates, a subset of ``METHODS``;
    - ``targets``: the datasets tested without training (transfer protocols only);
    - ``coop``: ``{"train": CoOp settings}`` from the ``coop`` preset, or None when CoOp is
      neither evaluated nor the bank's base model;
    - ``zero_shot`` and ``target_templates``: the zero-shot prompt templates per dataset;
    - ``prompt_file`` and ``target_prompt_files`` ({target: file}): the files of CAPT's
      semantic prompts for the dataset trained on and for the targets; a dataset without
      a file uses its default source (``load_protocol_prompts``).

    ``shots`` is required by protocols with several shot counts. ``backbone`` overrides
    the backbone section of both methods (see ``backbone_overrides``), and ``capt`` and
    ``coop`` override their method's other sections, nested or dotted
    (``{"train.epochs": 5}``). ``targets`` None picks the protocol's targets for its own
    source dataset and ``OFFLINE_TARGETS`` for Fashion-MNIST.
    """
    _check_choice("protocol", protocol, PROTOCOLS)
    methods = _checked_methods(methods)
    shot_override = {} if shots is None else {"shots": int(shots)}
    backbone_section = {"backbone": dict(backbone)} if backbone else {}

    capt_overrides = {**shot_override, **backbone_section, **dict(capt or {})}
    settings = resolve_run_settings(protocol, capt_preset, dataset, seed, capt_overrides, directory=directory)
    if settings["trainer"] != "capt":
        raise ValueError(
            f"capt_preset={capt_preset!r} is a preset of trainer {settings['trainer']!r}; CAPT's settings come from "
            "a method preset of trainer 'capt', such as 'capt'"
        )
    base_model = settings["bank"]["base_model"]

    coop_settings = None
    if "coop" in methods or base_model == "coop":
        coop_overrides = {**shot_override, **backbone_section, **dict(coop or {})}
        coop_settings = resolve_run_settings(protocol, "coop", dataset, seed, coop_overrides, directory=directory)
        if coop_settings["backbone"] != settings["backbone"]:
            raise ValueError(
                f"the coop and capt presets resolve to different backbones ({coop_settings['backbone']} and "
                f"{settings['backbone']}); one run shares one backbone, so give both presets the same backbone section"
            )

    targets = _resolve_targets(protocol, dataset, targets)
    unknown_files = sorted(set(target_prompt_files or {}) - set(targets))
    if unknown_files:
        raise ValueError(f"target_prompt_files names {unknown_files}, which are not among the targets {targets}")
    settings.update(
        methods=list(methods),
        targets=list(targets),
        coop=None if coop_settings is None else {"train": coop_settings["train"]},
        zero_shot={"templates": list(templates_for(dataset))},
        target_templates={target: list(templates_for(target)) for target in targets},
        prompt_file=None if prompt_file is None else str(prompt_file),
        target_prompt_files={target: str(path) for target, path in (target_prompt_files or {}).items()},
    )
    if coop_settings is not None:
        settings["provenance"]["coop"] = {
            key: coop_settings["provenance"][key] for key in ("method_preset", "rules_applied", "overrides", "sources")
        }
    return settings


def templates_for(dataset: str) -> tuple[str, ...]:
    """Return the zero-shot prompt templates of ``dataset``: Fashion-MNIST's, or the manifest's template."""
    if dataset in FASHION_MNIST_DATASETS:
        return FASHION_MNIST_TEMPLATES
    return (load_manifest(dataset).template,)


def load_protocol_backbone(
    settings: Mapping[str, Any], device: str | torch.device = "auto", cache_dir: str | os.PathLike | None = None
) -> Backbone:
    """Load the backbone of ``settings["backbone"]``; ``cache_dir`` is where MiniCLIP is cached."""
    values = dict(settings["backbone"])
    if cache_dir is not None:
        values["cache_dir"] = str(cache_dir)
    return load_backbone(BackboneConfig(**values), device=device)


def capt_configs(settings: Mapping[str, Any]) -> tuple[CAPTConfig, CAPTTrainConfig]:
    """Return the CAPT model and training configs of resolved settings."""
    return config_from_dict(CAPTConfig, settings["model"]), config_from_dict(CAPTTrainConfig, settings["train"])


def coop_config(settings: Mapping[str, Any]) -> CoOpConfig:
    """Return the CoOp config of resolved settings, raising ValueError when they have none."""
    if settings.get("coop") is None:
        raise ValueError(
            "these settings have no CoOp section; resolve them with 'coop' in methods or with CoOp as the bank's base model"
        )
    return config_from_dict(CoOpConfig, settings["coop"]["train"])


def config_from_dict(config_class: type, values: Mapping[str, Any]) -> Any:
    """Build a (nested) config dataclass from ``dataclasses.asdict`` output or its JSON copy."""
    unknown = sorted(set(values) - {field.name for field in dataclasses.fields(config_class)})
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}")

    arguments = {}
    for field in dataclasses.fields(config_class):
        if field.name not in values:
            continue
        value = values[field.name]
        default = _field_default(field)
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = config_from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        arguments[field.name] = value
    return config_class(**arguments)


def load_protocol_prompts(
    dataset: str, classnames: Sequence[str], backbone: Backbone, prompt_file: str | os.PathLike | None = None
) -> PairPrompts:
    """Return the commonality and difference sentences of ``classnames`` for CAPT's SEM.

    ``prompt_file`` (the per-class or pair shape, see ``capt_lib.prompts.semantic``) wins.
    Without one, Fashion-MNIST datasets use the built-in sentences, and any other dataset
    gets sentences built from its zero-shot template alone, with a warning.
    """
    classnames = tuple(classnames)
    if prompt_file is not None:
        return load_semantic_prompts(prompt_file, classnames, tokenizer=backbone.tokenizer)

    if dataset in FASHION_MNIST_DATASETS:
        builtin = load_builtin_prompts("fashion_mnist", tokenizer=backbone.tokenizer)
        return builtin.subset(classnames)

    logger.warning(
        "no semantic prompt file for %s: the commonality and difference sentences contain the class names only; "
        "pass prompt_file (per-class descriptions, e.g. the CAPT authors' LLM-written files) for real prompts",
        dataset,
    )
    template = templates_for(dataset)[0]
    descriptions = {name: [template.format(name)] for name in classnames}
    return pair_prompts_from_class_descriptions(descriptions, classnames, backbone.tokenizer, source=f"{dataset} template")


# ---- results of one run -----------------------------------------------------------------


@dataclass
class ProtocolResult:
    """The result of one protocol run."""

    settings: dict  # the resolved settings plus ``backbone_record`` (the loaded backbone's facts)
    metrics: dict  # the metrics of results.json: numbers, and {target: accuracy} mappings
    outputs: dict  # intermediate results for figures: the task, each method's outputs, trained models, the bank


@dataclass
class AllClassTask:
    """A few-shot task over every class of a dataset, with the frozen backbone's cached outputs."""

    classnames: tuple[str, ...]  # all classes, in label order
    train: SplitTensors  # ``shots`` training images per class
    val: SplitTensors  # min(shots, 4) validation images per class
    test: SplitTensors  # the whole test split
    train_dataset: ClassificationDataset  # the images behind ``train``
    test_dataset: ClassificationDataset  # the images behind ``test``
    settings: dict  # what the task was built from


def run_protocol(
    backbone: Backbone,
    settings: Mapping[str, Any],
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ProtocolResult:
    """Run the protocol of ``settings`` on ``backbone`` for its one dataset and seed."""
    protocol = settings["protocol"]
    if protocol == "base_to_novel":
        return run_base_to_novel(backbone, settings, data_root=data_root, cache_dir=cache_dir)
    if protocol in TRANSFER_PROTOCOLS:
        return run_transfer(backbone, settings, data_root=data_root, cache_dir=cache_dir)
    if protocol == "few_shot":
        return run_few_shot(backbone, settings, data_root=data_root, cache_dir=cache_dir)
    raise ValueError(f"settings have protocol={protocol!r}, which is invalid; choose one of {list(PROTOCOLS)}")


def run_base_to_novel(
    backbone: Backbone,
    settings: Mapping[str, Any],
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ProtocolResult:
    """Train on the base classes and test base and novel classes, for every method of ``settings``.

    Zero-shot CLIP always runs, because it is the default base model of the bank. CAPT's
    metrics add the pair resolution rate on the base test images.
    """
    _check_run_settings(settings, ("base_to_novel",))
    methods = settings["methods"]
    task = pipeline.prepare_task(
        backbone, settings["dataset"], settings["shots"], settings["seed"], data_root=data_root, cache_dir=cache_dir
    )

    zero_shot = pipeline.run_zero_shot(backbone, task, settings["zero_shot"]["templates"])
    coop = None
    if settings["coop"] is not None:
        coop = pipeline.run_coop(backbone, task, coop_config(settings))

    metrics: dict[str, Any] = {}
    outputs: dict[str, Any] = {"task": task, "zero_shot": zero_shot, "coop": coop}
    accuracy_names = ("base_accuracy", "novel_accuracy", "hm")
    if "zero_shot" in methods:
        metrics.update(_prefixed("zero_shot", {name: zero_shot["metrics"][name] for name in accuracy_names}))
    if "coop" in methods:
        metrics.update(_prefixed("coop", {name: coop["metrics"][name] for name in accuracy_names}))

    if "capt" in methods:
        capt_config, train_config = capt_configs(settings)
        _check_placement(capt_config, settings)
        base_output = coop if settings["bank"]["base_model"] == "coop" else zero_shot
        bank = pipeline.build_bank(backbone, task, base_output["base_text"], base_model_description(settings), cache_dir=cache_dir)
        prompts = load_protocol_prompts(settings["dataset"], task.classnames, backbone, settings["prompt_file"])
        capt = pipeline.run_capt(backbone, task, bank, base_output, prompts, capt_config, train_config)
        metrics.update(_finite_numbers(capt["metrics"]))
        outputs.update(capt=capt, bank=bank)

    return ProtocolResult(with_backbone_record(settings, backbone), metrics, outputs)


def run_few_shot(
    backbone: Backbone,
    settings: Mapping[str, Any],
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ProtocolResult:
    """Train on every class with ``settings["shots"]`` images each and test on the whole test split."""
    _check_run_settings(settings, ("few_shot",))
    task = prepare_all_class_task(
        backbone, settings["dataset"], settings["shots"], settings["seed"], data_root=data_root, cache_dir=cache_dir
    )
    trained = _train_all_class(backbone, task, settings, cache_dir)
    return ProtocolResult(with_backbone_record(settings, backbone), trained.pop("metrics"), {"task": task, **trained})


def run_transfer(
    backbone: Backbone,
    settings: Mapping[str, Any],
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ProtocolResult:
    """Train on every class of the source dataset, then test each target dataset without training.

    Each method meets a target's classes as it meets novel classes in base-to-novel.
    Zero-shot CLIP and CoOp's learned context build the target's class text features.
    CAPT's trained modules run on top of the base model's target features with the
    target's semantic prompts and without bank counts, because the bank records the
    source's classes only.
    """
    _check_run_settings(settings, TRANSFER_PROTOCOLS)
    task = prepare_all_class_task(
        backbone, settings["dataset"], settings["shots"], settings["seed"], data_root=data_root, cache_dir=cache_dir
    )
    trained = _train_all_class(backbone, task, settings, cache_dir)
    metrics = trained.pop("metrics")

    per_target: dict[str, dict[str, float]] = {method: {} for method in settings["methods"]}
    for target in tqdm(settings["targets"], desc="target datasets", leave=False):
        accuracies = _evaluate_target(backbone, target, settings, trained, data_root, cache_dir)
        for method, value in accuracies.items():
            per_target[method][target] = value
    for method, values in per_target.items():
        metrics[f"{METRIC_PREFIXES[method]}target_accuracy"] = values
    return ProtocolResult(with_backbone_record(settings, backbone), metrics, {"task": task, **trained})


def prepare_all_class_task(
    backbone: Backbone,
    dataset: str,
    shots: int,
    seed: int,
    *,
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    with_tokens: bool = True,
) -> AllClassTask:
    """Sample ``shots`` training and min(shots, 4) validation images per class, and encode every split (cached)."""
    if shots < 1:
        raise ValueError(f"shots={shots} is invalid for an all-class few-shot task; it must be at least 1")
    train_pool = load_dataset(dataset, "train", data_root)
    val_pool = load_dataset(dataset, "val", data_root)
    test = load_dataset(dataset, "test", data_root)
    for split in (val_pool, test):
        if split.classnames != train_pool.classnames:
            raise ValueError(f"{dataset}: the {split.split} split has other class names than the train split")

    train_few = sample_few_shot(train_pool, shots, seed)
    val_few = sample_few_shot(val_pool, min(shots, 4), seed)
    return AllClassTask(
        classnames=test.classnames,
        train=encode_split(backbone, train_few, cache_dir, with_tokens),
        val=encode_split(backbone, val_few, cache_dir, with_tokens),
        test=encode_split(backbone, test, cache_dir, with_tokens),
        train_dataset=train_few,
        test_dataset=test,
        settings={"dataset": dataset, "shots": shots, "seed": seed, "classes": "all", "backbone": backbone.key},
    )


def encode_split(
    backbone: Backbone, dataset: ClassificationDataset, cache_dir: str | os.PathLike | None, with_tokens: bool = True
) -> SplitTensors:
    """Encode ``dataset`` with the frozen backbone (cached on disk) into row-aligned tensors."""
    features = encode_dataset(dataset=dataset, backbone=backbone, cache_dir=cache_dir, with_tokens=with_tokens)
    return SplitTensors(features=features.features, labels=features.labels, sample_ids=features.indices, tokens=features.tokens)


def base_model_description(settings: Mapping[str, Any]) -> dict:
    """Describe the bank's base model completely, for the bank's cache key."""
    if settings["bank"]["base_model"] == "coop":
        return {"kind": "coop", "config": dataclasses.asdict(coop_config(settings))}
    return {"kind": "zero_shot", "templates": list(settings["zero_shot"]["templates"])}


def with_backbone_record(settings: Mapping[str, Any], backbone: Backbone) -> dict:
    """Return ``settings`` plus ``backbone_record``: the loaded backbone's name, weights key and random-weights flag."""
    record = {
        "name": backbone.name,
        "pretrained": backbone.pretrained,
        "key": backbone.key,
        "random_weights": bool(backbone.random_weights),
    }
    return {**settings, "backbone_record": record}


def _train_all_class(backbone: Backbone, task: AllClassTask, settings: Mapping[str, Any], cache_dir) -> dict:
    """Train every method on the all-class task; return its metrics, text features and trained models."""
    methods = settings["methods"]
    zero_shot_text = pipeline.zero_shot_text_features(backbone, task.classnames, settings["zero_shot"]["templates"])
    metrics: dict[str, Any] = {}
    trained: dict[str, Any] = {"zero_shot_text": zero_shot_text}
    if "zero_shot" in methods:
        metrics["zero_shot_accuracy"] = accuracy(pipeline.logits_from_text(backbone, task.test.features, zero_shot_text), task.test.labels)

    if settings["coop"] is not None:
        config = coop_config(settings)
        model, history = train_coop(
            backbone, task.train.features, task.train.labels, task.classnames, config,
            val_features=task.val.features, val_labels=task.val.labels,
        )
        with torch.no_grad():
            coop_text = model.text_features()
        trained.update(coop_model=model, coop_text=coop_text, coop_history=history)
        if "coop" in methods:
            metrics["coop_accuracy"] = accuracy(pipeline.logits_from_text(backbone, task.test.features, coop_text), task.test.labels)

    if "capt" in methods:
        base_text = trained["coop_text"] if settings["bank"]["base_model"] == "coop" else zero_shot_text
        capt = _train_capt_all_classes(backbone, task, base_text, settings, cache_dir)
        metrics.update(capt.pop("metrics"))
        trained.update(capt)
    return {"metrics": metrics, **trained}


def _train_capt_all_classes(backbone: Backbone, task: AllClassTask, base_text: torch.Tensor, settings, cache_dir) -> dict:
    """Build the bank over every class, train CAPT, and test it on the task's test split."""
    capt_config, train_config = capt_configs(settings)
    _check_placement(capt_config, settings)
    bank = build_all_class_bank(backbone, task, base_text, base_model_description(settings), cache_dir=cache_dir)
    prompts = load_protocol_prompts(settings["dataset"], task.classnames, backbone, settings["prompt_file"])
    # NOTE: the pair prompt features are two (C, C, E) tensors; for ImageNet's 1,000 classes at E = 512
    # that is 4 GB, and every pair's sentences pass the text encoder. No ImageNet-scale run has been made.
    common, difference = pipeline.encode_prompts_for(backbone, prompts, task.classnames)

    torch.manual_seed(train_config.seed)
    model = CAPTModel(backbone, base_text, bank, common, difference, capt_config).to(backbone.device)
    try:
        result = train_capt(model, task.train, task.val, train_config)
        logits = predict_logits(model, task.test)
    finally:
        _remove_adapter_hooks(model)

    base_logits = pipeline.logits_from_text(backbone, task.test.features, base_text)
    metrics = {"accuracy": accuracy(logits, task.test.labels)}
    metrics.update(_finite_numbers(all_class_pair_metrics(bank, base_logits, logits, task.test.labels)))
    return {"metrics": metrics, "capt_model": model, "capt_logits": logits, "capt_history": result.history, "bank": bank}


def build_all_class_bank(
    backbone: Backbone,
    task: AllClassTask,
    base_text: torch.Tensor,
    base_model: dict,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> ConfusionBank:
    """Stage 1 over every class: the base model's predictions on the few-shot training split, cached."""
    return pipeline.build_bank_for_split(
        backbone, task.train, task.classnames, base_text, base_model, task.settings, cache_dir=cache_dir
    )


all_class_pair_metrics = pipeline.bank_pair_metrics  # the same metric over every class of an all-class task


def _evaluate_target(backbone: Backbone, target: str, settings, trained: dict, data_root, cache_dir) -> dict[str, float]:
    """Accuracy of every method on the whole test split of ``target``, without training on it."""
    methods = settings["methods"]
    test_dataset = load_dataset(target, "test", data_root)
    test = encode_split(backbone, test_dataset, cache_dir, with_tokens="capt" in methods)
    classnames = test_dataset.classnames
    zero_shot_text = pipeline.zero_shot_text_features(backbone, classnames, settings["target_templates"][target])

    results = {}
    if "zero_shot" in methods:
        results["zero_shot"] = accuracy(pipeline.logits_from_text(backbone, test.features, zero_shot_text), test.labels)
    coop_text = None
    if settings["coop"] is not None:
        coop_text = pipeline.coop_text_features(backbone, trained["coop_model"], classnames, coop_config(settings))
        if "coop" in methods:
            results["coop"] = accuracy(pipeline.logits_from_text(backbone, test.features, coop_text), test.labels)

    if "capt" in methods:
        base_text = coop_text if settings["bank"]["base_model"] == "coop" else zero_shot_text
        prompts = load_protocol_prompts(target, classnames, backbone, settings["target_prompt_files"].get(target))
        logits = transfer_capt(backbone, trained["capt_model"], base_text, prompts, classnames, test, settings)
        results["capt"] = accuracy(logits, test.labels)
    return results


def transfer_capt(
    backbone: Backbone,
    trained: CAPTModel,
    base_text: torch.Tensor,
    prompts: PairPrompts,
    classnames: Sequence[str],
    split: SplitTensors,
    settings: Mapping[str, Any],
) -> torch.Tensor:
    """Logits (N, C) of CAPT's trained modules on another label space, without bank counts.

    A CAPT model for ``classnames`` is built from their base-model text features and
    semantic prompts, and every trained parameter is copied in. Raises ValueError when a
    trained parameter does not fit, which happens when the target has too few classes
    for the K-means centres that MGDE's semantic experts were built with.
    """
    capt_config, train_config = capt_configs(settings)
    common, difference = pipeline.encode_prompts_for(backbone, prompts, classnames)

    torch.manual_seed(train_config.seed)
    model = CAPTModel(backbone, base_text, None, common, difference, capt_config).to(backbone.device)
    try:
        _load_trained_parameters(model, trained, len(classnames))
        return predict_logits(model, split)
    finally:
        _remove_adapter_hooks(model)


def _load_trained_parameters(model: CAPTModel, trained: CAPTModel, num_classes: int) -> None:
    """Copy every trained parameter of ``trained`` into ``model``, raising ValueError when shapes differ."""
    trained_state = {name: p.detach() for name, p in trained.named_parameters() if p.requires_grad}
    target_state = model.state_dict()
    mismatched = [
        f"{name}: trained {tuple(value.shape)}, target {tuple(target_state[name].shape)}"
        for name, value in trained_state.items()
        if name in target_state and target_state[name].shape != value.shape
    ]
    if mismatched:
        raise ValueError(
            f"CAPT's trained parameters do not fit the {num_classes}-class target: {mismatched}; "
            "the target has too few classes for model.mgde.n_centres, so lower it in the settings"
        )
    model.load_state_dict(trained_state, strict=False)


def _check_placement(capt_config: CAPTConfig, settings: Mapping[str, Any]) -> None:
    if capt_config.use_adapter and capt_config.adapter.placement != "after_last_block":
        raise ValueError(
            f"{settings['protocol']} runs support the adapter placement 'after_last_block' only, got "
            f"model.adapter.placement={capt_config.adapter.placement!r}: protocol runs cache the last-block tokens "
            "and keep no preprocessed images, which the in-block placement needs"
        )


def _remove_adapter_hooks(model: CAPTModel) -> None:
    if model.adapter_hooks is not None:
        model.adapter_hooks.remove()


# ---- runs of a notebook -----------------------------------------------------------------


def find_runs_dir(output_dir: str | os.PathLike, notebook: str | os.PathLike, dataset: str, seed: int) -> Path | None:
    """Return the runs folder that contains every run of ``notebook``, or None outside that layout.

    Runs live at ``<runs_dir>[/<variant>]/<notebook stem>/<dataset>/seed<seed>``
    (``papermill_runner.run_dir_for`` and ``capt_lib.runs.sweep``). The variant folder of
    a grid sweep, such as ``shots-4``, is recognised from the parameters in the run's
    run.json: a folder named by ``<name>-<value>`` pairs of those parameters, joined by
    "_", is a variant, and the runs folder is its parent.
    """
    output_dir = Path(output_dir).resolve()
    stem = Path(notebook).stem
    if len(output_dir.parents) < 3:
        return None
    if output_dir.name != f"seed{seed}" or output_dir.parent.name != dataset or output_dir.parents[1].name != stem:
        return None

    above = output_dir.parents[2]
    if _is_variant_folder(above.name, _run_parameters(output_dir)):
        return above.parent
    return above


def collect_protocol_runs(
    notebook: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    metrics: Mapping[str, Any],
    *,
    runs_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Return every run of ``notebook`` (``tables.collect_results`` rows), this run included as finished.

    While a notebook runs, its run.json still records "running", so this run's row is
    replaced by one built from ``settings`` and ``metrics``. With ``runs_dir`` None the
    folder comes from ``find_runs_dir``. When output_dir lies outside the runs layout, the
    table contains this run only.
    """
    output_dir = Path(output_dir).resolve()
    dataset, seed = settings["dataset"], int(settings["seed"])
    if runs_dir is None:
        runs_dir = find_runs_dir(output_dir, notebook, dataset, seed)
    runs = collect_results(runs_dir, notebook) if runs_dir is not None else _empty_runs()
    if len(runs):
        keep = [Path(folder).resolve() != output_dir for folder in runs["run_dir"]]
        runs = runs[keep]

    variant = ""
    if runs_dir is not None and output_dir.is_relative_to(Path(runs_dir).resolve()):
        relative = output_dir.relative_to(Path(runs_dir).resolve()).parts  # ([variant,] stem, dataset, seedN)
        variant = relative[0] if len(relative) == 4 else ""
    current = {
        "notebook": Path(notebook).stem,
        "variant": variant,
        "dataset": dataset,
        "seed": seed,
        "shots": settings.get("shots"),
        "status": STATUS_COMPLETE,
        "run_dir": str(output_dir),
        "error": None,
        "settings": _as_stored(settings),
        "parameters": _run_parameters(output_dir),
        **flatten_metrics(metrics),
    }
    combined = pd.concat([runs, pd.DataFrame([current])], ignore_index=True) if len(runs) else pd.DataFrame([current])
    metric_columns = sorted(set(combined.columns) - set(RUN_COLUMNS))
    combined = combined.reindex(columns=RUN_COLUMNS + metric_columns)
    return combined.sort_values(["variant", "dataset", "seed"], kind="stable", ignore_index=True)


def method_runs(runs: pd.DataFrame, method: str) -> pd.DataFrame:
    """Return ``runs`` with ``method``'s metric columns under the plain names the table builders read."""
    _check_choice("method", method, METHODS)
    prefix = METRIC_PREFIXES[method]
    other_prefixes = [value for key, value in METRIC_PREFIXES.items() if key != method and value]
    renamed = {}
    for column in runs.columns:
        if column in RUN_COLUMNS:
            renamed[column] = column
        elif prefix and column.startswith(prefix):
            renamed[column] = column[len(prefix):]
        elif not prefix and not any(column.startswith(other) for other in other_prefixes):
            renamed[column] = column
    selected = runs[list(renamed)].rename(columns=renamed)
    return selected


def expected_seeds(protocol: str, directory: str | os.PathLike | None = None) -> tuple[int, ...]:
    """Return the seeds the protocol preset averages over."""
    return tuple(load_preset(protocol, directory=directory)["seeds"])


# ---- tables -----------------------------------------------------------------------------


def base_to_novel_tables(runs: pd.DataFrame, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (1, 2, 3)) -> pd.DataFrame:
    """Return ``tables.base_to_novel_table`` of every method, indexed by (method, dataset), with a ``backbone`` column."""
    frames = {}
    for method in _checked_methods(methods):
        table = base_to_novel_table(method_runs(runs, method), seeds, ignored_settings=PROTOCOL_IGNORED_SETTINGS)
        frames[METHOD_TITLES[method]] = _with_backbone_column(table, runs, ("dataset",))
    return pd.concat(frames, names=["method"])


def capt_paper_comparison(runs: pd.DataFrame, seeds: Sequence[int] = (1, 2, 3)) -> pd.DataFrame:
    """Put CAPT's base-to-novel results beside its published Table 1, with the differences ours - paper.

    Rows: the eleven published datasets, their ``average`` (compared only when all eleven
    are complete), then every other dataset that was run, with no published numbers.
    """
    capt_runs = method_runs(runs, "capt")
    published = base_to_novel_table(capt_runs, seeds, BASE_TO_NOVEL_DATASETS, ignored_settings=PROTOCOL_IGNORED_SETTINGS)
    comparison = compare_with_paper(published)

    present = [] if runs.empty else list(dict.fromkeys(runs["dataset"]))
    others = [name for name in present if name not in BASE_TO_NOVEL_DATASETS]
    if others:
        extra = base_to_novel_table(capt_runs, seeds, others, ignored_settings=PROTOCOL_IGNORED_SETTINGS).drop(index=AVERAGE)
        comparison = pd.concat([comparison, compare_with_paper(extra)])
    return _with_backbone_column(comparison, runs, ("dataset",))


def method_average_table(runs: pd.DataFrame, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (1, 2, 3)) -> pd.DataFrame:
    """Average base, novel and HM over the eleven published datasets: each method of these runs, then the published averages.

    An average of these runs exists only when every dataset is complete. Otherwise its
    status counts the complete datasets. The published rows are CAPT's Table 1 averages of CAPT and
    its baselines (CoOp, MaPLe, PromptKD).
    """
    rows = []
    for method in _checked_methods(methods):
        table = base_to_novel_table(method_runs(runs, method), seeds, BASE_TO_NOVEL_DATASETS, ignored_settings=PROTOCOL_IGNORED_SETTINGS)
        average = table.loc[AVERAGE]
        rows.append({"source": OURS_SOURCE_LABEL, "method": METHOD_TITLES[method], "base": average["base"],
                     "novel": average["novel"], "hm": average["hm"], "status": average["status"]})
    for method in published_methods():
        average = paper_base_to_novel(method).loc[AVERAGE]
        rows.append({"source": PAPER_SOURCE_LABEL, "method": method, "base": average["base"], "novel": average["novel"],
                     "hm": average["hm"], "status": "published"})
    return pd.DataFrame(rows).set_index(["source", "method"])


def transfer_tables(
    runs: pd.DataFrame, protocol: str, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (1, 2, 3)
) -> pd.DataFrame:
    """Summarise transfer runs per method and source: the source's accuracy, each target's, and their average.

    The published protocol's source and targets come first (ImageNet and its targets,
    "not run yet" until runs exist), then every other source dataset found in ``runs``.
    Each source lists the targets its runs recorded, after the published ones. Indexed
    by (method, source, dataset).
    """
    _check_choice("protocol", protocol, TRANSFER_PROTOCOLS)
    paper_source, paper_targets = PAPER_TRANSFER[protocol]
    sources = {paper_source: list(paper_targets)}
    for source, targets in recorded_targets(runs).items():
        found = sources.setdefault(source, [])
        found.extend(target for target in targets if target not in found)

    build_table = TRANSFER_TABLES[protocol]
    frames = {}
    for method in _checked_methods(methods):
        selected = method_runs(runs, method)
        per_source = {
            source: build_table(selected, seeds, source=source, targets=targets, ignored_settings=PROTOCOL_IGNORED_SETTINGS)
            for source, targets in sources.items()
        }
        table = pd.concat(per_source, names=["source"])
        frames[METHOD_TITLES[method]] = _with_backbone_column(table, runs, ("source",))
    return pd.concat(frames, names=["method"])


def recorded_targets(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Return {source dataset: targets} from the settings of finished runs, targets in first-seen order."""
    targets: dict[str, list[str]] = {}
    for _, run in runs.iterrows():
        settings = run["settings"]
        if not isinstance(settings, Mapping):
            targets.setdefault(run["dataset"], [])
            continue
        found = targets.setdefault(run["dataset"], [])
        found.extend(target for target in settings.get("targets", []) if target not in found)
    return targets


def few_shot_tables(
    runs: pd.DataFrame,
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = (1, 2, 3),
    shots: Sequence[int] = (1, 2, 4, 8, 16),
) -> pd.DataFrame:
    """Return ``tables.few_shot_table`` of every method, indexed by (method, dataset, shots), with a ``backbone`` column."""
    unplaced = runs["shots"].isna() if len(runs) else pd.Series(dtype=bool)
    if unplaced.any():
        logger.warning(
            "leaving out runs that record no shot count (they failed before writing settings): %s",
            sorted(runs.loc[unplaced, "run_dir"]),
        )
        runs = runs[~unplaced]
    frames = {}
    for method in _checked_methods(methods):
        table = few_shot_table(method_runs(runs, method), shots, seeds, ignored_settings=PROTOCOL_IGNORED_SETTINGS)
        frames[METHOD_TITLES[method]] = _with_backbone_column(table, runs, ("dataset", "shots"))
    return pd.concat(frames, names=["method"])


def few_shot_overview(table: pd.DataFrame, shots: int) -> pd.DataFrame:
    """Lay out one shot count of ``few_shot_tables`` as ``accuracy_overview`` does."""
    return accuracy_overview(table.xs(shots, level="shots"))


def accuracy_overview(table: pd.DataFrame) -> pd.DataFrame:
    """Lay out a per-method accuracy table with one column per method: "mean ± std", or the status.

    ``table`` is indexed by (method, rows...), as ``transfer_tables`` and one shot count of
    ``few_shot_tables`` are. The result is indexed by the rows and ends with ``backbone``.
    """
    methods = list(dict.fromkeys(table.index.get_level_values("method")))
    per_method = {method: table.xs(method, level="method") for method in methods}
    rows = per_method[methods[0]].index
    overview = pd.DataFrame(index=rows)
    for method in methods:
        overview[method] = [_format_accuracy(per_method[method].loc[row]) for row in rows]
    overview["backbone"] = [_join_labels(per_method[method].loc[row, "backbone"] for method in methods) for row in rows]
    return overview


def base_to_novel_overview(tables: pd.DataFrame) -> pd.DataFrame:
    """Lay out ``base_to_novel_tables`` with one column per method: "base / novel / HM", or the status."""
    methods = list(dict.fromkeys(tables.index.get_level_values("method")))
    per_method = {method: tables.xs(method, level="method") for method in methods}
    datasets = per_method[methods[0]].index
    overview = pd.DataFrame(index=datasets)
    for method in methods:
        cells = []
        for dataset in datasets:
            row = per_method[method].loc[dataset]
            complete = row["status"] == STATUS_COMPLETE
            cells.append(f"{row['base']:.2f} / {row['novel']:.2f} / {row['hm']:.2f}" if complete else str(row["status"]))
        overview[method] = cells
    overview["backbone"] = [_join_labels(per_method[method].loc[dataset, "backbone"] for method in methods) for dataset in datasets]
    return overview


def run_metrics_table(settings: Mapping[str, Any], metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Tabulate one run's numbers, a row per method: base, novel and HM, or accuracy and one column per target."""
    rows = {}
    for method in settings["methods"]:
        prefix = METRIC_PREFIXES[method]
        if settings["protocol"] == "base_to_novel":
            rows[METHOD_TITLES[method]] = {name: metrics[prefix + key] for name, key in
                                           (("base", "base_accuracy"), ("novel", "novel_accuracy"), ("hm", "hm"))}
            continue
        row = {settings["dataset"]: metrics[prefix + "accuracy"]}
        row.update(metrics.get(prefix + "target_accuracy", {}))
        rows[METHOD_TITLES[method]] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


def few_shot_curve(runs: pd.DataFrame, dataset: str, methods: Sequence[str] = METHODS) -> pd.DataFrame:
    """Mean accuracy per shot count of ``dataset``'s finished runs, a column per method, whatever seeds exist.

    Unlike ``few_shot_tables``, a shot count with fewer seeds than the protocol expects
    still gets a mean, so the curve shows partial results. ``seeds`` counts the runs behind
    each row.
    """
    finished = runs[(runs["dataset"] == dataset) & (runs["status"] == STATUS_COMPLETE) & runs["shots"].notna()]
    curve = pd.DataFrame(index=pd.Index(sorted(int(value) for value in set(finished["shots"])), name="shots"))
    for method in _checked_methods(methods):
        selected = method_runs(finished, method)
        means = selected.groupby(selected["shots"].astype(int))["accuracy"].mean() if "accuracy" in selected else pd.Series(dtype=float)
        curve[METHOD_TITLES[method]] = [means.get(count, math.nan) for count in curve.index]
    curve["seeds"] = [int((finished["shots"] == count).sum()) for count in curve.index]
    return curve


def describe_difference(name: str, value: float, other_name: str, other_value: float, metric: str) -> str:
    """Return a sentence comparing two numbers in percent, e.g. "CAPT's HM (71.20 %) is 2.10 points above CoOp's (69.10 %)."."""
    difference = value - other_value
    if math.isclose(difference, 0.0, abs_tol=5e-3):
        return f"{name}'s {metric} ({value:.2f} %) equals {other_name}'s ({other_value:.2f} %)."
    direction = "above" if difference > 0 else "below"
    return f"{name}'s {metric} ({value:.2f} %) is {abs(difference):.2f} points {direction} {other_name}'s ({other_value:.2f} %)."


def protocol_table_markdown(table: pd.DataFrame, decimals: int = 2) -> str:
    """Render a protocol table as Markdown, with NaN as "-" (``tables.to_markdown``)."""
    return to_markdown(table, decimals=decimals)


def random_weights_note(runs: pd.DataFrame) -> str:
    """Return a sentence naming the runs whose backbone has random weights, or "" when there are none."""
    flagged = []
    for _, run in runs.iterrows():
        settings = run["settings"]
        if isinstance(settings, Mapping) and settings.get("backbone_record", {}).get("random_weights"):
            flagged.append(f"{run['dataset']} seed {run['seed']}")
    if not flagged:
        return ""
    return (
        f"{len(flagged)} run(s) used a backbone with {RANDOM_WEIGHTS_LABEL} ({', '.join(flagged)}): "
        "their numbers test the code path only and are not CLIP results."
    )


def backbone_label(settings: Mapping[str, Any]) -> str:
    """Name a run's backbone for the tables, e.g. "MiniCLIP (default)" or "ViT-B-16 (openai)", flagging random weights."""
    section = settings.get("backbone", {})
    name = section.get("model_name", "?")
    if name == MINICLIP_NAME:
        detail = section.get("miniclip_recipe")
    elif section.get("checkpoint"):
        detail = Path(section["checkpoint"]).name
    else:
        detail = section.get("pretrained")
    label = f"{name} ({detail})"
    if settings.get("backbone_record", {}).get("random_weights"):
        label += f", {RANDOM_WEIGHTS_LABEL}"
    return label


def write_tables(output_dir: str | os.PathLike, tables: Mapping[str, pd.DataFrame]) -> list[Path]:
    """Write each table as ``<name>.csv`` and ``<name>.md`` in ``output_dir``, atomically; return the paths."""
    written = []
    for name, table in tables.items():
        written.append(atomic_write_text(Path(output_dir) / f"{name}.csv", table.to_csv()))
        written.append(atomic_write_text(Path(output_dir) / f"{name}.md", protocol_table_markdown(table)))
    return written


# ---- helpers ----------------------------------------------------------------------------


def _check_choice(name: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is invalid; choose one of {list(valid)}")


def _checked_methods(methods: Sequence[str]) -> list[str]:
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods is empty; choose from {list(METHODS)}")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"methods {unknown} are unknown; choose from {list(METHODS)}")
    return list(dict.fromkeys(methods))


def _resolve_targets(protocol: str, dataset: str, targets: Sequence[str] | None) -> list[str]:
    if protocol not in TRANSFER_PROTOCOLS:
        if targets:
            raise ValueError(f"protocol {protocol!r} tests no target datasets, but targets={list(targets)} was passed")
        return []
    if targets is not None:
        targets = list(targets)
        if not targets:
            raise ValueError(f"targets is empty; a {protocol} run tests at least one target dataset")
        return targets

    source, paper_targets = PAPER_TRANSFER[protocol]
    if dataset == source:
        return list(paper_targets)
    if dataset in FASHION_MNIST_DATASETS:
        return [target for target in OFFLINE_TARGETS if target != dataset]
    raise ValueError(
        f"no default targets for a {protocol} run trained on {dataset!r}; pass targets, e.g. {list(paper_targets)}"
    )


def _check_run_settings(settings: Mapping[str, Any], protocols: Sequence[str]) -> None:
    if settings.get("protocol") not in protocols:
        raise ValueError(
            f"these settings are for protocol {settings.get('protocol')!r}, but this function runs {list(protocols)}; "
            "call run_protocol, which picks the right one"
        )
    if "methods" not in settings:
        raise ValueError("settings lack 'methods'; build them with resolve_protocol_settings")


def _prefixed(method: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{METRIC_PREFIXES[method]}{name}": float(value) for name, value in metrics.items()}


def _finite_numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Drop NaN values, which JSON cannot hold: the pair resolution rate is NaN without in-pair mistakes."""
    return {name: value for name, value in metrics.items() if not (isinstance(value, float) and math.isnan(value))}


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _is_variant_folder(name: str, parameters: Mapping[str, Any]) -> bool:
    """True when ``name`` is "_"-joined ``<parameter>-<value>`` items of ``parameters`` (a sweep's grid folder)."""
    items = sorted({f"{key}-{value}" for key, value in parameters.items()}, key=len, reverse=True)

    def consists_of_items(rest: str) -> bool:
        if rest in items:
            return True
        return any(rest.startswith(item + "_") and consists_of_items(rest[len(item) + 1:]) for item in items)

    return bool(name) and consists_of_items(name)


def _run_parameters(output_dir: Path) -> dict:
    """Return the parameters recorded in ``output_dir/run.json``, or {} for a folder without one."""
    path = output_dir / RUN_RECORD_FILE
    return dict(read_json(path).get("parameters", {})) if path.is_file() else {}


def _as_stored(settings: Mapping[str, Any]) -> dict:
    """Return ``settings`` as results.json stores them (tuples become lists), so they compare equal to stored runs."""
    return json.loads(json.dumps(settings, default=str))


def _empty_runs() -> pd.DataFrame:
    return pd.DataFrame(columns=RUN_COLUMNS)


def _with_backbone_column(table: pd.DataFrame, runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Add a ``backbone`` column naming, per row, the backbone of the runs behind it ("" for rows without runs)."""
    labels: dict[tuple, list[str]] = {}
    for _, run in runs.iterrows():
        if not isinstance(run["settings"], Mapping):
            continue
        key = tuple(run["dataset"] if name in ("dataset", "source") else run[name] for name in keys)
        found = labels.setdefault(key, [])
        label = backbone_label(run["settings"])
        if label not in found:
            found.append(label)

    column = []
    for index in table.index:
        index = index if isinstance(index, tuple) else (index,)
        column.append(_join_labels(labels.get(tuple(index[: len(keys)]), [])))
    table = table.copy()
    table["backbone"] = column
    return table


def _join_labels(labels) -> str:
    unique = [label for label in dict.fromkeys(labels) if label]
    return "; ".join(unique)


def _format_accuracy(row: pd.Series) -> str:
    if row["status"] != STATUS_COMPLETE:
        return str(row["status"])
    if isinstance(row["accuracy_std"], float) and math.isnan(row["accuracy_std"]):
        return f"{row['accuracy']:.2f}"
    return f"{row['accuracy']:.2f} ± {row['accuracy_std']:.2f}"
