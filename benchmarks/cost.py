"""Measure what a CAPT training epoch costs, as three ratios with targets.

1. CAPT epoch time / CoOp epoch time on the same backbone, synthetic data and batch
   size. CoOp trains on cached image features and re-encodes its prompts through the
   text tower at every step. CAPT trains with its default ``CAPTConfig``: the adapter
   after the last block on cached last-block tokens, SAM retrieval, the L_confuse
   forward of the retrieved images, and frozen base text features. Target: at most 1.3.
2. CAPT epoch time when the frozen backbone is recomputed at every step (the same
   adapter, MGDE and loss, with ``backbone.visual_tokens(images)`` under no_grad)
   divided by the time with cached tokens. Target: at least 20.
3. The per-image retrieval loop divided by the batched Sample Confusion Miner, measured
   by ``benchmarks/retrieval.py`` on a synthetic bank the size of ImageNet's base split
   (8,000 rows, 500 classes). Target: at least 50.

The backbone has the architecture of the CAPT paper (Shao et al., CVPR 2026): open_clip
ViT-B-16 at 224 px, here with random weights. They are saved once under the capt cache folder and loaded from that file, so
the numbers are timings only. The synthetic task is C classes x S shots of random
pixels, with class names "class 0", "class 1", ..., and a Confusion Bank built from
random logits, so that SAM finds confused images for many pairs. Each reported epoch
time is the median over the timed epochs that follow one warm-up epoch. Wall-clock time
gives the ratios; the CPU time of the process is recorded beside it, because other
processes on a shared machine disturb it less.

Run it from the repository root (a few minutes on 2 CPU cores with the defaults; on a
machine that other jobs share, ``--threads 1`` gives steadier numbers):

    .venv/bin/python benchmarks/cost.py --out runs/cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import os
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from capt_lib.backbones.base import Backbone
from capt_lib.backbones.loading import BackboneConfig, load_backbone, save_random_checkpoint
from capt_lib.confusion.bank import build_confusion_bank
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors, train_capt
from capt_lib.training.coop_trainer import CoOpConfig, train_coop
from capt_lib.utils.cache import resolve_cache_dir
from capt_lib.utils.device import resolve_device
from capt_lib.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

RANDOM_CHECKPOINT_DIR = "random_checkpoints"  # cache sub-folder of the random-weight checkpoints
ENCODE_BATCH_SIZE = 16  # images per forward pass when the synthetic split's tokens are cached
RANDOM_WEIGHTS_LINE = "random weights: timing only"

# name -> (how the ratio is formed, comparison with the target, target)
TARGETS = {
    "capt_over_coop": ("CAPT epoch / CoOp epoch", "<=", 1.3),
    "recompute_over_cached": ("recomputed-backbone epoch / cached-token epoch", ">=", 20.0),
    "retrieval_loop_over_batched": ("per-image retrieval loop / batched retrieval", ">=", 50.0),
}


@dataclass(frozen=True)
class CostSettings:
    """Sizes, seeds and device of the cost benchmark."""

    model_name: str = "ViT-B-16"  # open_clip architecture, built with random weights
    classes: int = 10  # classes of the synthetic task
    shots: int = 4  # training images per class
    batch_size: int = 8  # images per step, for every method
    repeats: int = 3  # timed epochs of CoOp and of CAPT with cached tokens, after one warm-up epoch each
    recompute_repeats: int = 1  # timed epochs of CAPT with the backbone recomputed, after one warm-up epoch
    retrieval_bank_size: int = 8000  # bank rows in the retrieval ratio; 8000 is ImageNet's base split at 16 shots
    retrieval_repeats: int = 20  # timed calls of the batched retrieval
    retrieval_loop_repeats: int = 3  # timed calls of the per-image retrieval loop
    seed: int = 0  # seed of the synthetic images, the bank and the training order
    weights_seed: int = 0  # seed of the random backbone weights; each seed caches its own checkpoint file
    device: str = "auto"  # "cpu", "cuda" or "auto" (CUDA when available)
    threads: int | None = None  # torch CPU threads; None keeps torch's choice

    def __post_init__(self):
        sizes = ("classes", "shots", "batch_size", "repeats", "recompute_repeats", "retrieval_repeats", "retrieval_loop_repeats")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"CostSettings.{name}={getattr(self, name)} is invalid; it must be at least 1")
        if self.classes < 3:
            raise ValueError(
                f"CostSettings.classes={self.classes} is invalid; it must be at least 3, because the default "
                "SEMConfig.k=2 needs two partner classes besides the pseudo label"
            )
        if self.retrieval_bank_size < 2:
            raise ValueError(f"CostSettings.retrieval_bank_size={self.retrieval_bank_size} is invalid; it must be at least 2")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"CostSettings.threads={self.threads} is invalid; use None or at least 1")


@dataclass
class SyntheticTask:
    """Random-pixel training images and the frozen backbone's cached outputs for them."""

    classnames: tuple[str, ...]  # "class 0", "class 1", ...
    images: torch.Tensor  # (N, 3, image_size, image_size) random pixels, already normalised
    split: SplitTensors  # cached features (N, E) and last-block tokens (N, 1 + HW, W), labels, sample ids
    encode_seconds: float  # one-time cost of filling the token cache


class RecomputedSplit(SplitTensors):
    """A split whose batches run the frozen backbone again instead of reading cached tokens.

    ``batch`` returns the same keyword arguments as ``SplitTensors.batch`` for the
    after-last-block placement, so the training step is unchanged apart from the
    backbone forward pass. The cached ``features`` still serve SAM's retrieval queries.
    """

    def __init__(self, split: SplitTensors, images: torch.Tensor, backbone: Backbone):
        super().__init__(features=split.features, labels=split.labels, sample_ids=split.sample_ids, images=images)
        self.backbone = backbone

    def batch(self, rows: torch.Tensor, device: torch.device) -> dict:
        images = self.images[rows].to(device)  # (B, 3, H, W)
        with torch.no_grad():
            tokens = self.backbone.visual_tokens(images)  # (B, 1 + HW, W)
            features = F.normalize(self.backbone.visual_head(tokens).float(), dim=-1)  # (B, E)
        return {"base_features": features, "tokens": tokens}


def random_checkpoint(model_name: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached random-weight checkpoint of ``model_name``, writing it on the first call."""
    path = resolve_cache_dir(cache_dir) / RANDOM_CHECKPOINT_DIR / f"{model_name}-seed{seed}.safetensors"
    if path.is_file():
        logger.info("reusing the random %s checkpoint %s", model_name, path)
        return path
    return save_random_checkpoint(model_name, path, seed=seed)


def load_random_backbone(settings: CostSettings, cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Load ``settings.model_name`` with cached random weights onto ``settings.device``."""
    checkpoint = random_checkpoint(settings.model_name, settings.weights_seed, cache_dir)
    return load_backbone(BackboneConfig(settings.model_name, checkpoint=str(checkpoint)), device=settings.device)


def synthetic_task(backbone: Backbone, classes: int, shots: int, seed: int) -> SyntheticTask:
    """Draw ``classes * shots`` random images and cache their features and last-block tokens."""
    generator = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    images = torch.randn(classes * shots, 3, size, size, generator=generator)  # (N, 3, H, W)
    labels = torch.arange(classes).repeat_interleave(shots)  # (N,)

    device = backbone.device
    start = time.perf_counter()
    feature_batches, token_batches = [], []
    for first in tqdm(range(0, len(images), ENCODE_BATCH_SIZE), desc="caching tokens", leave=False):
        batch = images[first : first + ENCODE_BATCH_SIZE].to(device)
        with torch.no_grad():
            tokens = backbone.visual_tokens(batch)  # (b, 1 + HW, W)
            features = F.normalize(backbone.visual_head(tokens).float(), dim=-1)  # (b, E)
        token_batches.append(tokens.float().cpu())
        feature_batches.append(features.cpu())
    _synchronize(device)
    encode_seconds = time.perf_counter() - start

    split = SplitTensors(
        features=torch.cat(feature_batches),  # (N, E)
        labels=labels,
        sample_ids=torch.arange(len(images)),
        tokens=torch.cat(token_batches),  # (N, 1 + HW, W)
    )
    classnames = tuple(f"class {c}" for c in range(classes))
    return SyntheticTask(classnames, images, split, encode_seconds)


def build_capt_model(backbone: Backbone, task: SyntheticTask, config: CAPTConfig, seed: int) -> CAPTModel:
    """CAPT on ``task`` with prototype base text features, a random-logit bank and random pair prompts.

    Random-pixel images through random weights give nearly identical features, so
    zero-shot text features would give every image the same pseudo label and SAM would
    retrieve the same few bank images all the time. The base text features are therefore
    the class means of the cached features, centred on their overall mean: pseudo labels
    then vary across images as a trained base model's do. The bank's logits are random,
    so that confused images exist for many class pairs. The pair prompt features are
    random unit vectors, because their values do not change the cost of a step.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    features, labels = task.split.features, task.split.labels
    num_classes = len(task.classnames)
    class_means = torch.stack([features[labels == c].mean(dim=0) for c in range(num_classes)])  # (C, E)
    base_text = F.normalize(class_means - features.mean(dim=0), dim=-1)  # (C, E)

    embed_dim = base_text.shape[1]
    logits = 4.0 * torch.randn(len(task.split), num_classes, generator=generator)  # (N, C)
    bank = build_confusion_bank(logits, labels, features, task.split.sample_ids, task.classnames)

    commonality = F.normalize(torch.randn(num_classes, num_classes, embed_dim, generator=generator), dim=-1)
    commonality = F.normalize(commonality + commonality.transpose(0, 1), dim=-1)  # (C, C, E), symmetric in the pair
    difference = F.normalize(torch.randn(num_classes, num_classes, embed_dim, generator=generator), dim=-1)  # (C, C, E)

    torch.manual_seed(seed)
    device = backbone.device
    return CAPTModel(backbone, base_text.to(device), bank, commonality.to(device), difference.to(device), config).to(device)


def capt_epoch_runner(model: CAPTModel, train: SplitTensors, val: SplitTensors, config: CAPTTrainConfig) -> Callable[[], object]:
    """Return a function that trains ``model`` for one epoch with ``train_capt`` and returns its result.

    Each call is a complete ``train_capt`` run with ``epochs=1``, so its time includes the
    per-run setup (optimizer, schedule) and the validation pass over ``val``. Both are
    small next to the training steps when ``val`` contains a single image.
    """
    one_epoch = dataclasses.replace(config, epochs=1)
    return lambda: train_capt(model, train, val, one_epoch)


def coop_epoch_runner(backbone: Backbone, task: SyntheticTask, config: CoOpConfig) -> Callable[[], object]:
    """Return a function that trains CoOp for one epoch on the cached features with ``train_coop``.

    Each call is a complete ``train_coop`` run with ``epochs=1`` and no warm-up epoch,
    without validation, so its time includes building the prompt learner and optimizer.
    """
    one_epoch = dataclasses.replace(config, epochs=1, warmup_epochs=0)
    return lambda: train_coop(backbone, task.split.features, task.split.labels, task.classnames, one_epoch)


@dataclass
class EpochTimes:
    """Times of the timed epochs of one method, warm-up excluded."""

    wall: list[float]  # wall-clock seconds (time.perf_counter), after a CUDA synchronisation on GPUs
    cpu: list[float]  # CPU seconds of this process over all its threads (time.process_time); on CUDA it includes host waits


def epoch_times(run_epoch: Callable[[], None], repeats: int, device: torch.device, name: str) -> EpochTimes:
    """Run one warm-up epoch, then time ``repeats`` more epochs."""
    run_epoch()
    _synchronize(device)
    wall, cpu = [], []
    for _ in tqdm(range(repeats), desc=f"timing {name}", leave=False):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        run_epoch()
        _synchronize(device)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return EpochTimes(wall, cpu)


def retrieval_timing(device: torch.device, bank_size: int, repeats: int, loop_repeats: int, seed: int) -> dict:
    """Time batched against looped SAM retrieval with ``benchmarks/retrieval.py``, for CAPT's default mode and k.

    The retrieval script's bank has 8,000 rows. A smaller ``bank_size`` keeps evenly
    spaced rows of it (for quick test runs), and a larger one raises ValueError.
    """
    retrieval = _load_sibling_module("retrieval")
    full_size = retrieval.NUM_CLASSES * retrieval.SHOTS
    if not 2 <= bank_size <= full_size:
        raise ValueError(f"retrieval_bank_size={bank_size} is invalid; it must lie in [2, {full_size}]")

    bank = retrieval.synthetic_bank(seed)
    if bank_size < full_size:
        # The bank is sorted by class, so evenly spaced rows cover the classes evenly.
        rows = torch.arange(bank_size) * full_size // bank_size  # (bank_size,)
        bank = {name: (tensor if name == "partners" else tensor[rows]) for name, tensor in bank.items()}

    defaults = CAPTConfig()
    options = types.SimpleNamespace(seed=seed, repeats=repeats, loop_repeats=loop_repeats)
    row = retrieval.benchmark(device, bank, defaults.sam.mode, defaults.sem.k, options)
    return {**row, "bank_rows": bank_size, "bank_classes": retrieval.NUM_CLASSES, "queries": retrieval.BATCH_SIZE}


def cost_ratios(times: dict[str, float]) -> dict[str, dict]:
    """Turn median times into the three ratios, each with its target and whether it is met.

    ``times`` contains the median seconds ``capt_epoch``, ``coop_epoch``,
    ``recompute_epoch``, ``retrieval_batched`` and ``retrieval_loop``.
    """
    values = {
        "capt_over_coop": times["capt_epoch"] / times["coop_epoch"],
        "recompute_over_cached": times["recompute_epoch"] / times["capt_epoch"],
        "retrieval_loop_over_batched": times["retrieval_loop"] / times["retrieval_batched"],
    }
    ratios = {}
    for name, value in values.items():
        description, comparison, target = TARGETS[name]
        met = value <= target if comparison == "<=" else value >= target
        ratios[name] = {"ratio": value, "description": description, "target": f"{comparison} {target:g}", "met": met}
    return ratios


def hardware_info(device: torch.device) -> dict:
    """CPU model, core and thread counts, GPU name and software versions of this run."""
    info = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }
    return info


def time_training_epochs(backbone: Backbone, task: SyntheticTask, settings: CostSettings) -> dict:
    """Time CoOp, CAPT with cached tokens and CAPT with the backbone recomputed, on the same task and batch size."""
    device = backbone.device
    coop_config = dataclasses.replace(CoOpConfig(), batch_size=settings.batch_size, seed=settings.seed)
    capt_config = CAPTConfig()
    train_config = dataclasses.replace(CAPTTrainConfig(), batch_size=settings.batch_size, seed=settings.seed)

    coop = epoch_times(coop_epoch_runner(backbone, task, coop_config), settings.repeats, device, "CoOp")

    # The cached and the recomputed runs start from identical CAPT models and validate on one image.
    val = first_rows(task.split, 1)
    model = build_capt_model(backbone, task, capt_config, settings.seed)
    capt_run = capt_epoch_runner(model, task.split, val, train_config)
    capt = epoch_times(capt_run, settings.repeats, device, "CAPT, cached tokens")

    recompute_model = build_capt_model(backbone, task, capt_config, settings.seed)
    recompute_train = RecomputedSplit(task.split, task.images, backbone)
    recompute_val = RecomputedSplit(val, task.images[:1], backbone)
    recompute_run = capt_epoch_runner(recompute_model, recompute_train, recompute_val, train_config)
    recompute = epoch_times(recompute_run, settings.recompute_repeats, device, "CAPT, recomputed backbone")

    return {
        "times": {"coop": coop, "capt": capt, "recompute": recompute},
        "retrieved_per_step": retrieved_per_step(model, task.split, train_config),
        "configs": {
            "capt": dataclasses.asdict(capt_config),
            "capt_train": dataclasses.asdict(train_config),
            "coop": dataclasses.asdict(coop_config),
        },
    }


def backbone_shape(backbone: Backbone) -> dict:
    """Block counts and token sizes of the backbone, which the cost of each method scales with."""
    visual = backbone.model.visual
    grid_height, grid_width = visual.grid_size
    return {
        "visual_layers": visual.transformer.layers,
        "width": visual.transformer.width,
        "tokens": 1 + grid_height * grid_width,
        "text_layers": backbone.model.transformer.layers,
        "context_length": backbone.context_length,
    }


def run_cost_benchmark(settings: CostSettings = CostSettings(), cache_dir: str | os.PathLike | None = None) -> dict:
    """Measure the three cost ratios with ``settings`` and return them with every time and the hardware."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    settings = dataclasses.replace(settings, device=str(device))

    start = time.perf_counter()
    backbone = load_random_backbone(settings, cache_dir)
    load_seconds = time.perf_counter() - start
    task = synthetic_task(backbone, settings.classes, settings.shots, settings.seed)
    epochs = time_training_epochs(backbone, task, settings)
    retrieval = retrieval_timing(
        device, settings.retrieval_bank_size, settings.retrieval_repeats, settings.retrieval_loop_repeats, settings.seed
    )

    times = epochs["times"]
    median_times = {
        "coop_epoch": statistics.median(times["coop"].wall),
        "capt_epoch": statistics.median(times["capt"].wall),
        "recompute_epoch": statistics.median(times["recompute"].wall),
        "retrieval_batched": retrieval["batched_ms"] / 1000,
        "retrieval_loop": retrieval["loop_ms"] / 1000,
    }
    median_cpu = {name: statistics.median(method.cpu) for name, method in times.items()}
    return {
        "settings": dataclasses.asdict(settings),
        "random_weights": backbone.random_weights,
        "note": RANDOM_WEIGHTS_LINE,
        "hardware": hardware_info(device),
        "backbone": backbone_shape(backbone),
        "training_images": len(task.split),
        "steps_per_epoch": math.ceil(len(task.split) / settings.batch_size),
        "retrieved_per_step": epochs["retrieved_per_step"],
        "epoch_seconds": {name: method.wall for name, method in times.items()},
        "epoch_cpu_seconds": {name: method.cpu for name, method in times.items()},
        "median_seconds": median_times,
        "median_cpu_seconds": median_cpu,
        "one_time_seconds": {"load_backbone": load_seconds, "cache_tokens": task.encode_seconds},
        "retrieval": retrieval,
        "ratios": cost_ratios(median_times),
        # The same epoch ratios from CPU time, which other processes on a shared machine disturb less.
        "cpu_ratios": {
            "capt_over_coop": median_cpu["capt"] / median_cpu["coop"],
            "recompute_over_cached": median_cpu["recompute"] / median_cpu["capt"],
        },
        "configs": epochs["configs"],
    }


@torch.no_grad()
def retrieved_per_step(model: CAPTModel, split: SplitTensors, config: CAPTTrainConfig) -> float:
    """Mean number of distinct bank images that SAM adds to a training step, over the batches of ``split``."""
    if model.sam is None:
        return 0.0
    device = model.logit_scale.device
    model.train()  # SAM retrieves in training mode only
    counts = []
    for start in range(0, len(split), config.batch_size):
        features = split.features[start : start + config.batch_size].to(device)  # (B, E)
        mined = model.sem(model.base_probabilities(features))
        sample_ids = split.sample_ids[start : start + config.batch_size].to(device)
        retrieved = model.sam.retrieve(features, mined.pseudo_labels, mined.pair_classes, sample_ids)  # (B, k), -1 for none
        counts.append(len(retrieved[retrieved >= 0].unique()))
    return sum(counts) / len(counts)


def first_rows(split: SplitTensors, count: int) -> SplitTensors:
    """Return the first ``count`` rows of a split with cached tokens."""
    return SplitTensors(
        features=split.features[:count],
        labels=split.labels[:count],
        sample_ids=split.sample_ids[:count],
        tokens=None if split.tokens is None else split.tokens[:count],
    )


def format_table(result: dict) -> str:
    """Render the times and ratios of ``run_cost_benchmark`` as a plain-text table."""
    seconds, cpu = result["median_seconds"], result["median_cpu_seconds"]
    hardware = result["hardware"]
    lines = [
        f"{result['settings']['model_name']}, {RANDOM_WEIGHTS_LINE}",
        f"hardware: {hardware['gpu'] or hardware['cpu']} ({hardware['cpu_cores_visible']} cores visible, "
        f"{hardware['torch_threads']} torch threads), torch {hardware['torch']}",
        f"task: {result['training_images']} images, {result['steps_per_epoch']} steps per epoch, "
        f"{result['retrieved_per_step']:.1f} retrieved images per step",
        "",
        f"{'median':<34} {'wall s':>9} {'CPU s':>9}",
        f"{'CoOp epoch (text tower every step)':<34} {seconds['coop_epoch']:>9.3f} {cpu['coop']:>9.3f}",
        f"{'CAPT epoch, cached tokens':<34} {seconds['capt_epoch']:>9.3f} {cpu['capt']:>9.3f}",
        f"{'CAPT epoch, recomputed backbone':<34} {seconds['recompute_epoch']:>9.3f} {cpu['recompute']:>9.3f}",
        f"{'retrieval call, batched':<34} {seconds['retrieval_batched']:>9.4f}",
        f"{'retrieval call, per-image loop':<34} {seconds['retrieval_loop']:>9.4f}",
        "",
        f"{'ratio (wall time)':<50} {'value':>8} {'target':>8}  met  {'from CPU time':>13}",
    ]
    for name, entry in result["ratios"].items():
        from_cpu = f"{result['cpu_ratios'][name]:>13.2f}" if name in result["cpu_ratios"] else f"{'-':>13}"
        lines.append(
            f"{entry['description']:<50} {entry['ratio']:>8.2f} {entry['target']:>8}  {str(entry['met']):<5}{from_cpu}"
        )
    return "\n".join(lines)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo on Linux, else the name from ``platform``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load_sibling_module(name: str) -> types.ModuleType:
    """Import ``benchmarks/<name>.py`` by path, because the benchmarks folder is not a package."""
    path = Path(__file__).with_name(f"{name}.py")
    if not path.is_file():
        raise FileNotFoundError(f"benchmark module not found: {path}")
    spec = importlib.util.spec_from_file_location(f"capt_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look a class's module up there
    spec.loader.exec_module(module)
    return module


def parse_settings(argv: list[str] | None = None) -> tuple[CostSettings, str | None, str | None]:
    """Read the command line into settings, the JSON output path and the cache folder."""
    defaults = CostSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=defaults.device, help="'cpu', 'cuda' or 'auto' (CUDA when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", default=defaults.model_name, help="open_clip architecture, built with random weights")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="classes of the synthetic task")
    parser.add_argument("--shots", type=int, default=defaults.shots, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per training step")
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help="timed CoOp and cached-token CAPT epochs after one warm-up epoch"
    )
    parser.add_argument(
        "--recompute-repeats", type=int, default=defaults.recompute_repeats, help="timed recomputed-backbone CAPT epochs"
    )
    parser.add_argument("--retrieval-bank-size", type=int, default=defaults.retrieval_bank_size, help="bank rows, at most 8000")
    parser.add_argument("--retrieval-repeats", type=int, default=defaults.retrieval_repeats, help="timed batched retrieval calls")
    parser.add_argument(
        "--retrieval-loop-repeats", type=int, default=defaults.retrieval_loop_repeats, help="timed per-image loop calls"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the images, the bank and the order")
    parser.add_argument("--weights-seed", type=int, default=defaults.weights_seed, help="seed of the random weights")
    parser.add_argument("--cache-dir", default=None, help="capt cache root (default: $CAPT_CACHE_DIR or runs/cache)")
    parser.add_argument("--out", default=None, help="JSON file for the results, written atomically")
    args = parser.parse_args(argv)

    settings = CostSettings(
        model_name=args.model,
        classes=args.classes,
        shots=args.shots,
        batch_size=args.batch_size,
        repeats=args.repeats,
        recompute_repeats=args.recompute_repeats,
        retrieval_bank_size=args.retrieval_bank_size,
        retrieval_repeats=args.retrieval_repeats,
        retrieval_loop_repeats=args.retrieval_loop_repeats,
        seed=args.seed,
        weights_seed=args.weights_seed,
        device=args.device,
        threads=args.threads,
    )
    return settings, args.out, args.cache_dir


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings, out, cache_dir = parse_settings(argv)
    print(RANDOM_WEIGHTS_LINE)
    result = run_cost_benchmark(settings, cache_dir)
    print(format_table(result))
    if out:
        atomic_write_json(out, result)
        print(f"results written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
