"""Shared steps of the ablation notebooks: CAPT variants over seeds, and the inputs and outputs of each module.

``prepare_inputs`` builds what every CAPT run of a notebook shares: the few-shot task of
each seed, the base model's result, its Confusion Bank and the pair prompts.
``run_variants`` trains every CAPT variant (a name and a ``CAPTConfig``) on every seed's
task and returns one row of metrics per (variant, seed) plus a summary over seeds.
``run_capt_variant`` trains one variant like ``pipeline.run_capt`` and also works with
adapters inside the ViT blocks, which need the preprocessed images that
``task_with_images`` adds to a task. The other helpers tabulate what SEM, SAM and the
MGDE router do for given images, phrase the comparison of two means so that notebook
prose follows the numbers, and write the results files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from capt_lib.backbones.base import Backbone
from capt_lib.confusion.bank import ConfusionBank
from capt_lib.confusion.sample_miner import SAMConfig, SampleConfusionMiner
from capt_lib.confusion.semantic_miner import confusion_intensity, confusion_scores, count_shares, top_confusion_classes
from capt_lib.data.dataset import ClassificationDataset
from capt_lib.data.registry import load_dataset
from capt_lib.evaluation.metrics import harmonic_mean
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.modules.mgde import route_top_k
from capt_lib.prompts.semantic import PairPrompts, load_builtin_prompts
from capt_lib.runs import pipeline
from capt_lib.runs.pipeline import FewShotTask
from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors
from capt_lib.training.coop_trainer import CoOpConfig
from capt_lib.utils.io import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

# Metrics of one CAPT run that the per-seed table keeps, in column order.
RUN_METRICS = (
    "base_accuracy",
    "novel_accuracy",
    "hm",
    "pair_resolution_rate",
    "base_errors_in_pairs",
    "resolved",
    "newly_wrong",
    "newly_right",
)
SUMMARY_METRICS = ("base_accuracy", "novel_accuracy", "hm", "pair_resolution_rate", "newly_wrong")


# ---- tasks, base models and banks ---------------------------------------------------------


@dataclass
class AblationInputs:
    """Inputs that the CAPT runs of one notebook share, per few-shot seed."""

    tasks: dict[int, FewShotTask]  # seed -> few-shot task with cached frozen-backbone outputs
    zero_shot: dict  # run_zero_shot result, shared by all seeds because its text and test split do not depend on them
    coop: dict[int, dict]  # seed -> run_coop result, empty unless CoOp was trained
    base_outputs: dict[int, dict]  # seed -> result of the base model whose mistakes fill the bank
    banks: dict[int, ConfusionBank]  # seed -> Confusion Bank of the base model
    prompts: PairPrompts  # the dataset's built-in commonality and difference sentences


def prepare_inputs(
    backbone: Backbone,
    dataset: str,
    shots: int,
    seeds: Iterable[int],
    templates: Sequence[str],
    *,
    base_model: str = "zero_shot",
    coop_epochs: int = 200,
    with_coop: bool = False,
    data_root: str | os.PathLike | None = None,
) -> AblationInputs:
    """Sample and encode each seed's task, run the base model and build its Confusion Bank.

    ``base_model`` is "zero_shot" (zero-shot CLIP with ``templates``) or "coop" (CoOp
    trained per seed for ``coop_epochs``). CoOp is also trained when ``with_coop`` is
    set, for a notebook that compares against it. Banks are cached under the same key
    as in the confusion-discovery notebook, so the notebooks share them.
    """
    if base_model not in pipeline.BASE_MODELS:
        raise ValueError(f"base_model={base_model!r} is invalid; choose one of {pipeline.BASE_MODELS}")
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ValueError("prepare_inputs: seeds is empty; pass at least one few-shot seed")

    tasks = {s: pipeline.prepare_task(backbone, dataset, shots, s, data_root=data_root) for s in seeds}
    zero_shot = pipeline.run_zero_shot(backbone, tasks[seeds[0]], list(templates))
    coop = {}
    if base_model == "coop" or with_coop:
        coop = {s: pipeline.run_coop(backbone, tasks[s], CoOpConfig(epochs=coop_epochs, seed=s)) for s in seeds}

    base_outputs, banks = {}, {}
    for s in seeds:
        if base_model == "zero_shot":
            base_outputs[s] = zero_shot
            description = {"kind": "zero_shot", "templates": list(templates)}
        else:
            base_outputs[s] = coop[s]
            description = {"kind": "coop", "config": dataclasses.asdict(CoOpConfig(epochs=coop_epochs, seed=s))}
        banks[s] = pipeline.build_bank(backbone, tasks[s], base_outputs[s]["base_text"], description)

    prompts = load_builtin_prompts(dataset, tokenizer=backbone.tokenizer)
    return AblationInputs(tasks, zero_shot, coop, base_outputs, banks, prompts)


# ---- images for the in-block adapter ------------------------------------------------------


def preprocess_images(backbone: Backbone, dataset: ClassificationDataset, sample_ids: torch.Tensor) -> torch.Tensor:
    """Preprocess the images of ``dataset`` named by ``sample_ids`` (source indices): (N, 3, H, W).

    Rows follow ``sample_ids``, so they line up with the ``SplitTensors`` those ids came from.
    """
    positions = {int(index): position for position, index in enumerate(dataset.indices)}
    missing = [int(i) for i in sample_ids.tolist() if int(i) not in positions]
    if missing:
        raise ValueError(
            f"{dataset.name}/{dataset.split} has no images with source indices {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; pass the dataset the split was encoded from"
        )

    images = [
        backbone.preprocess(dataset.load_image(positions[int(i)]))
        for i in tqdm(sample_ids.tolist(), desc=f"preprocessing {dataset.name}/{dataset.split}", leave=False)
    ]
    return torch.stack(images)  # (N, 3, H, W)


def task_with_images(
    backbone: Backbone,
    task: FewShotTask,
    *,
    val_dataset: ClassificationDataset | None = None,
    data_root: str | os.PathLike | None = None,
) -> FewShotTask:
    """Return a copy of ``task`` whose train, val, test_base and test_novel splits carry preprocessed images.

    An adapter inside the ViT blocks (``placement="in_blocks"``) runs the frozen backbone
    on every step, so it needs images where the cached tokens suffice otherwise.
    ``task`` keeps no validation dataset, so it is loaded by name from ``data_root``
    unless ``val_dataset`` is given. ``test_all`` stays without images.
    """
    if val_dataset is None:
        val_dataset = load_dataset(task.settings["dataset"], "val", data_root)

    def add(split: SplitTensors, dataset: ClassificationDataset) -> SplitTensors:
        return dataclasses.replace(split, images=preprocess_images(backbone, dataset, split.sample_ids))

    return dataclasses.replace(
        task,
        train=add(task.train, task.train_dataset),
        val=add(task.val, val_dataset),
        test_base=add(task.test_base, task.test_dataset),
        test_novel=add(task.test_novel, task.test_dataset),
    )


# ---- one variant, many variants -----------------------------------------------------------


def run_capt_variant(
    backbone: Backbone,
    task: FewShotTask,
    bank: ConfusionBank,
    base_output: dict,
    prompts: PairPrompts,
    capt_config: CAPTConfig = CAPTConfig(),
    train_config: CAPTTrainConfig = CAPTTrainConfig(),
    *,
    keep_models: bool = False,
) -> dict:
    """Train CAPT on the base split and evaluate it on base and novel classes.

    This is ``pipeline.run_capt`` after a check that the task carries the preprocessed
    images an in-block adapter needs (see ``task_with_images``). With ``keep_models`` the
    result contains the trained base-class and novel-class models under ``"model"`` and
    ``"novel_model"``. In-block adapters are detached from the ViT by then, so those
    models can no longer classify images.
    """
    _check_images(capt_config, task)
    return pipeline.run_capt(
        backbone, task, bank, base_output, prompts, capt_config, train_config, keep_models=keep_models
    )


def _check_images(config: CAPTConfig, task: FewShotTask) -> None:
    if not (config.use_adapter and config.adapter.placement == "in_blocks"):
        return
    lacking = [name for name in ("train", "val", "test_base", "test_novel") if getattr(task, name).images is None]
    if lacking:
        raise ValueError(
            f"the in-block adapter runs the backbone on images, but the task's {lacking} split(s) have none; "
            "add them with capt_lib.runs.ablation.task_with_images"
        )


@dataclass
class VariantRuns:
    """Results of every CAPT variant on every seed."""

    per_seed: pd.DataFrame  # one row per (variant, seed): RUN_METRICS, best_epoch and seconds
    summary: pd.DataFrame  # one row per variant, in the order given: mean and std over seeds
    outputs: dict[tuple[str, int], dict]  # (variant, seed) -> the run_capt_variant result


def run_variants(
    backbone: Backbone,
    tasks: Mapping[int, FewShotTask],
    base_outputs: Mapping[int, dict],
    banks: Mapping[int, ConfusionBank],
    prompts: PairPrompts,
    variants: Mapping[str, CAPTConfig],
    train_config: CAPTTrainConfig,
    seeds: Sequence[int],
    *,
    keep_models: Collection[tuple[str, int]] = (),
) -> VariantRuns:
    """Train every variant on every seed and tabulate the metrics.

    ``tasks``, ``base_outputs`` and ``banks`` map a seed to its few-shot task, base-model
    result and Confusion Bank. Each run trains with ``train_config`` whose seed is
    replaced by the task's seed. ``keep_models`` lists the (variant, seed) runs whose
    trained models stay in ``outputs``.
    """
    _check_variant_inputs(tasks, base_outputs, banks, variants, seeds)
    rows, outputs = [], {}
    runs = [(name, seed) for seed in seeds for name in variants]
    for name, seed in tqdm(runs, desc="CAPT variants", leave=False):
        started = time.perf_counter()
        output = run_capt_variant(
            backbone,
            tasks[seed],
            banks[seed],
            base_outputs[seed],
            prompts,
            variants[name],
            dataclasses.replace(train_config, seed=seed),
            keep_models=(name, seed) in keep_models,
        )
        seconds = time.perf_counter() - started
        logger.info("CAPT variant %r, seed %d: HM %.2f in %.1f s", name, seed, output["metrics"]["hm"], seconds)

        row = {"variant": name, "seed": seed}
        row.update({key: output["metrics"][key] for key in RUN_METRICS})
        row.update(best_epoch=output["best_epoch"], seconds=seconds)
        rows.append(row)
        outputs[(name, seed)] = output

    per_seed = pd.DataFrame(rows, columns=["variant", "seed", *RUN_METRICS, "best_epoch", "seconds"])
    return VariantRuns(per_seed, summarise_variants(per_seed, order=list(variants)), outputs)


def _check_variant_inputs(tasks, base_outputs, banks, variants, seeds) -> None:
    if not variants:
        raise ValueError("run_variants: variants is empty; pass at least one name -> CAPTConfig")
    if not seeds:
        raise ValueError("run_variants: seeds is empty; pass at least one seed")
    for label, mapping in (("tasks", tasks), ("base_outputs", base_outputs), ("banks", banks)):
        missing = [seed for seed in seeds if seed not in mapping]
        if missing:
            raise ValueError(f"run_variants: {label} has no entry for seed(s) {missing}; it has {sorted(mapping)}")


def summarise_variants(
    per_seed: pd.DataFrame,
    metrics: Sequence[str] = SUMMARY_METRICS,
    order: Sequence[str] | None = None,
    *,
    by: str = "variant",
) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of each metric, one row per value of column ``by``.

    Columns are ``<metric>_mean`` and ``<metric>_std`` (0 for a single seed, as in
    ``pipeline.summarise_seeds``), ``hm_of_means`` (the HM of the mean base and mean novel
    accuracy) and ``seeds``. Rows follow ``order``, or the first appearance in ``per_seed``.
    NaN values, such as a pair resolution rate without base errors in pairs, are skipped.
    """
    unknown = [name for name in (by, *metrics) if name not in per_seed.columns]
    if unknown:
        raise ValueError(f"summarise_variants: per_seed lacks the column(s) {unknown}; it has {list(per_seed.columns)}")
    order = list(dict.fromkeys(per_seed[by])) if order is None else list(order)

    rows = []
    for name in order:
        runs = per_seed[per_seed[by] == name]
        if runs.empty:
            raise ValueError(f"summarise_variants: no rows with {by}={name!r}")
        row = {by: name}
        for metric in metrics:
            values = runs[metric].to_numpy(dtype=float)
            values = values[~np.isnan(values)]
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        if "base_accuracy" in metrics and "novel_accuracy" in metrics:
            row["hm_of_means"] = harmonic_mean(row["base_accuracy_mean"], row["novel_accuracy_mean"])
        row["seeds"] = len(runs)
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


def compare_means(
    name: str, mean: float, std: float, other_name: str, other_mean: float, other_std: float, *, metric: str = "HM"
) -> str:
    """Describe ``mean ± std`` of ``name`` against ``other_mean ± other_std`` of ``other_name`` in one sentence.

    The verdict is "higher" or "lower" when the means differ by more than the larger of the
    two standard deviations, and "within one standard deviation" otherwise, so a gap that
    the seeds' spread covers is never called a win. Numbers are in percentage points.
    """
    gap = mean - other_mean
    if abs(gap) <= max(std, other_std):
        verdict = f"within one standard deviation ({gap:+.2f} points)"
    else:
        verdict = f"{'higher' if gap > 0 else 'lower'} by {abs(gap):.2f} points, more than one standard deviation"
    return (
        f"The {metric} of {name} is {mean:.2f} ± {std:.2f} against {other_mean:.2f} ± {other_std:.2f} "
        f"for {other_name}: {verdict}."
    )


def compare_variants(summary: pd.DataFrame, reference: str, metric: str = "hm", label: str = "HM") -> list[str]:
    """Compare every variant of ``summary`` with ``reference``: one ``compare_means`` sentence each, names quoted."""
    if reference not in summary.index:
        raise ValueError(
            f"compare_variants: reference {reference!r} is not a variant; variants are {list(summary.index)}"
        )
    mean, std = f"{metric}_mean", f"{metric}_std"
    base = summary.loc[reference]
    return [
        compare_means(f"'{name}'", row[mean], row[std], f"'{reference}'", base[mean], base[std], metric=label)
        for name, row in summary.iterrows()
        if name != reference
    ]


def plot_variant_summary(
    summary: pd.DataFrame,
    metrics: Sequence[str] = ("base_accuracy", "novel_accuracy", "hm"),
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw the mean of each metric per variant as grouped horizontal bars, with the std over seeds as error bars."""
    labels = {"base_accuracy": "base", "novel_accuracy": "novel", "hm": "HM", "pair_resolution_rate": "pair resolution"}
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.0, 0.3 * len(summary) * len(metrics) + 1.5), layout="constrained")
    else:
        fig = ax.figure

    positions = np.arange(len(summary))
    height = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        ax.barh(
            positions + (i - (len(metrics) - 1) / 2) * height,
            summary[f"{metric}_mean"],
            height,
            xerr=summary[f"{metric}_std"],
            label=labels.get(metric, metric),
            capsize=2,
        )
    ax.set_yticks(positions, list(summary.index))
    ax.invert_yaxis()
    ax.set_xlabel("Accuracy (%), mean over seeds ± std")
    ax.set_ylabel("Variant")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "CAPT variants")
    return fig



def write_results(
    output_dir: str | os.PathLike,
    settings: Mapping,
    metrics: Mapping,
    tables: Mapping[str, pd.DataFrame],
    **extra,
) -> Path:
    """Write ``results.json`` and one ``<name>.csv`` per table into ``output_dir``, each atomically.

    ``results.json`` contains ``settings``, ``metrics``, every table as a list of records
    under ``tables`` and the ``extra`` keyword values. A named index becomes a column.
    Returns the path of ``results.json``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, table in tables.items():
        flat = table.reset_index() if table.index.name is not None else table
        atomic_write(output_dir / f"{name}.csv", lambda tmp, flat=flat: flat.to_csv(tmp, index=False))
        records[name] = flat.to_dict(orient="records")
    results = {"settings": dict(settings), "metrics": dict(metrics), "tables": records, **extra}
    return atomic_write_json(output_dir / "results.json", results)


# ---- what the modules see -----------------------------------------------------------------


def sem_pairs_table(
    probs: torch.Tensor,
    counts: torch.Tensor | None,
    classnames: Sequence[str],
    k: int,
    *,
    direction: str = "both",
    true_labels: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Tabulate SEM's confusion pairs for a few images: one row per (image, partner rank).

    ``probs`` (B, C) are base-model probabilities and ``counts`` the bank's (C, C)
    ``counts[t, p]``, or None for classes without a bank (novel classes). Columns:
    ``image`` (row of ``probs``), ``true`` (when ``true_labels`` is given),
    ``pseudo_label``, ``intensity`` (c), ``rank``, ``partner``, ``probability`` (C_i),
    ``count_share`` (n_{p,i} / sum_j n_{p,j}) and ``score`` (S_i = (1 + share) * C_i).
    """
    if counts is None:
        counts = torch.zeros(probs.shape[1], probs.shape[1])
    counts = torch.as_tensor(counts)
    pseudo = probs.argmax(dim=1)  # (B,)
    scores = confusion_scores(probs, pseudo, counts, direction)  # (B, C)
    partners = top_confusion_classes(scores, k)  # (B, k)
    intensity = confusion_intensity(probs, pseudo)  # (B,)
    shares = count_shares(counts, direction)  # (C, C)

    rows = []
    for image in range(len(probs)):
        p = int(pseudo[image])
        for rank, partner in enumerate(partners[image].tolist(), start=1):
            row = {"image": image}
            if true_labels is not None:
                row["true"] = classnames[int(true_labels[image])]
            row.update(
                pseudo_label=classnames[p],
                intensity=float(intensity[image]),
                rank=rank,
                partner=classnames[partner],
                probability=float(probs[image, partner]),
                count_share=float(shares[p, partner]),
                score=float(scores[image, partner]),
            )
            rows.append(row)
    return pd.DataFrame(rows)



def partner_recall(
    probs: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor | None, k: int, *, direction: str = "both"
) -> float:
    """Compute the percent of misclassified images whose true class is among SEM's top-k partners.

    An image is misclassified when its pseudo label (argmax of ``probs``) differs from
    ``labels``. With ``counts=None`` the partners are ranked by probability alone, the
    baseline that the bank's counts should beat. NaN when no image is misclassified.
    """
    num_classes = probs.shape[1]
    counts = torch.zeros(num_classes, num_classes) if counts is None else torch.as_tensor(counts)
    pseudo = probs.argmax(dim=1)  # (N,)
    wrong = pseudo != labels  # (N,)
    if not wrong.any():
        return math.nan

    scores = confusion_scores(probs[wrong], pseudo[wrong], counts, direction)  # (M, C)
    partners = top_confusion_classes(scores, k)  # (M, k)
    found = (partners == labels[wrong][:, None]).any(dim=1)  # (M,)
    return 100.0 * found.float().mean().item()


def sam_retrievals(
    bank: ConfusionBank,
    rows: Sequence[int],
    k: int,
    *,
    modes: Iterable[str] = ("representative", "random"),
    direction: str = "both",
    seed: int = 0,
) -> pd.DataFrame:
    """Tabulate the bank image SAM retrieves for some bank rows, for each of ``modes``.

    Pairs are found as in training: SEM's top-k partners of each row's pseudo label, from
    the bank's own probabilities and counts. Returns one row per (query row, partner
    rank, mode) with ``query_row``, ``rank``, ``partner``, ``mode``, ``candidates`` (|U|
    without the query itself), ``retrieved_row`` (-1 when U is empty) and ``cosine``
    (query feature against the retrieved one, NaN when none). ``seed`` seeds the draws
    of the "random" mode.
    """
    rows_tensor = torch.as_tensor(list(rows), dtype=torch.long)
    if len(rows_tensor) and (rows_tensor.min() < 0 or rows_tensor.max() >= len(bank)):
        raise ValueError(f"sam_retrievals: rows must lie in [0, {len(bank)}), the bank's rows; got {list(rows)}")
    pseudo = bank.pseudo_labels[rows_tensor]  # (R,)
    scores = confusion_scores(bank.probs[rows_tensor], pseudo, bank.counts, direction)  # (R, C)
    partners = top_confusion_classes(scores, k)  # (R, k)
    candidates = _candidate_counts(bank, rows_tensor, partners)  # (R, k)

    table = []
    for mode in modes:
        miner = SampleConfusionMiner(
            bank.features, bank.true_labels, bank.pseudo_labels, bank.sample_ids, bank.num_classes, SAMConfig(mode=mode)
        )
        retrieved = miner.retrieve(
            bank.features[rows_tensor],
            pseudo,
            partners,
            query_sample_ids=bank.sample_ids[rows_tensor],
            generator=torch.Generator().manual_seed(seed),
        )  # (R, k) bank rows, -1 where U is empty
        for i, query in enumerate(rows_tensor.tolist()):
            for slot in range(k):
                found = int(retrieved[i, slot])
                cosine = float(bank.features[query] @ bank.features[found]) if found >= 0 else math.nan
                table.append(
                    {
                        "query_row": query,
                        "rank": slot + 1,
                        "partner": int(partners[i, slot]),
                        "mode": mode,
                        "candidates": int(candidates[i, slot]),
                        "retrieved_row": found,
                        "cosine": cosine,
                    }
                )
    return pd.DataFrame(table)


def _candidate_counts(bank: ConfusionBank, rows: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """Count U for each (row, partner): confused bank rows of the pair in either direction, except the row itself."""
    counts = torch.zeros(partners.shape, dtype=torch.long)  # (R, k)
    for i, query in enumerate(rows.tolist()):
        a = int(bank.pseudo_labels[query])
        for slot, b in enumerate(partners[i].tolist()):
            in_pair = ((bank.true_labels == a) & (bank.pseudo_labels == b)) | (
                (bank.true_labels == b) & (bank.pseudo_labels == a)
            )
            in_pair[query] = False
            counts[i, slot] = int(in_pair.sum())
    return counts


@torch.no_grad()
def expert_usage(model: CAPTModel, split: SplitTensors, batch_size: int = 512) -> pd.DataFrame:
    """Average the MGDE router output per expert over a split, in eval mode.

    Columns: ``router_prob`` (mean full softmax), ``router_weight`` (mean top-k weight,
    renormalised, zero where an image was not routed to the expert) and ``routed_share``
    (share of images routed to the expert). Rows are the experts in router order.
    """
    if model.mgde is None or model.mgde.num_experts == 0:
        raise ValueError("expert_usage: the model has no MGDE experts (use_mgde=False or experts='none')")
    if model.needs_images:
        raise ValueError(
            "expert_usage supports the after-last-block adapter only: run_capt_variant detaches in-block "
            "adapters from the ViT after evaluation, so the model would run without them"
        )

    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    probs, weights, routed = [], [], []
    for start in range(0, len(split), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split)))
        output = model(**split.batch(rows, device))
        batch_weights, _ = route_top_k(output.router_probs, model.mgde.top_k)  # (B, n_experts)
        probs.append(output.router_probs.cpu())
        weights.append(batch_weights.cpu())
        routed.append(output.expert_mask.float().cpu())
    model.train(was_training)

    return pd.DataFrame(
        {
            "router_prob": torch.cat(probs).mean(dim=0).numpy(),
            "router_weight": torch.cat(weights).mean(dim=0).numpy(),
            "routed_share": torch.cat(routed).mean(dim=0).numpy(),
        },
        index=pd.Index(model.mgde.expert_names, name="expert"),
    )
