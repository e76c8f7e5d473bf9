"""Stage 2 of CAPT: train the CAPT modules on cached frozen-backbone outputs.

Stage 1 (the Confusion Bank) is built by the caller and handed to ``CAPTModel``.
Training reads only the training split and the bank; model selection uses the
validation split, never the test split. A checkpoint is written atomically after every
epoch, and ``train_capt`` resumes from it, reproducing the numbers of an uninterrupted run.

Under torchrun (see ``capt_lib.training.distributed``) every rank runs its share of each
batch and DistributedDataParallel averages the gradients. ``batch_size`` stays the global
batch, so the schedule and the steps per epoch do not depend on the number of ranks.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from capt_lib.modules.capt_model import CAPTModel
from capt_lib.modules.mgde import load_balancing_loss
from capt_lib.training import distributed
from capt_lib.training.losses import capt_loss
from capt_lib.utils.device import PRECISIONS, autocast, resolve_precision
from capt_lib.utils.io import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"


@dataclass(frozen=True)
class CAPTTrainConfig:
    """Optimisation settings of stage 2."""

    epochs: int = 30  # passes over the few-shot training split
    batch_size: int = 32  # images per step, summed over all ranks in a distributed run
    lr: float = 2e-3  # AdamW learning rate, cosine-decayed to zero
    weight_decay: float = 1e-4  # AdamW weight decay
    lam: float = 1.0  # lambda, the weight of L_confuse in L = L_ori + lambda * L_confuse
    temperature: float = 0.07  # temperature of the symmetric InfoNCE in L_confuse
    load_balance: float = 0.01  # weight of MGDE's load-balancing loss
    seed: int = 1  # seed of the batch order and of SAM's random mode
    precision: str = "fp32"  # autocast dtype of training steps: "fp32", "bf16" or "fp16" (fp32 on a CPU)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"CAPTTrainConfig.precision={self.precision!r} is invalid. Choose one of {sorted(PRECISIONS)}."
            )


@dataclass
class SplitTensors:
    """Cached frozen-backbone outputs of one split, row-aligned."""

    features: torch.Tensor  # (N, E) L2-normalised frozen image features
    labels: torch.Tensor  # (N,) int64 true labels
    sample_ids: torch.Tensor  # (N,) int64 source indices; bank rows name the same ids
    tokens: torch.Tensor | None = None  # (N, 1 + HW, W) last-block tokens (after-last-block placement)
    images: torch.Tensor | None = None  # (N, 3, H, W) preprocessed images (in-block placement)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: torch.Tensor, device: torch.device) -> dict:
        """Select ``rows`` and move them to ``device`` as keyword arguments of ``CAPTModel``."""
        batch = {"base_features": self.features[rows].to(device)}
        if self.tokens is not None:
            batch["tokens"] = self.tokens[rows].to(device)
        if self.images is not None:
            batch["images"] = self.images[rows].to(device)
        return batch


@dataclass
class CAPTTrainResult:
    history: list[dict]  # one row per epoch: losses, train and val accuracy
    best_epoch: int  # epoch (1-based) whose weights the model contains now
    best_val_accuracy: float  # validation accuracy of that epoch, percent


def train_capt(
    model: CAPTModel,
    train: SplitTensors,
    val: SplitTensors,
    config: CAPTTrainConfig = CAPTTrainConfig(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    stop_after_epoch: int | None = None,
) -> CAPTTrainResult:
    """Train the CAPT modules of ``model`` and load the weights of the best validation epoch.

    With ``checkpoint_dir``, an existing checkpoint there is resumed, and a new one is
    written after every epoch. ``stop_after_epoch`` ends the run early, leaving the
    checkpoint behind, as a killed run would (used by the resume test). In a distributed
    run every rank reads the checkpoint, so ``checkpoint_dir`` must be on a file system
    that all ranks see, and only rank 0 writes it.
    """
    device = model.logit_scale.device
    precision = resolve_precision(config.precision, device)
    dist_info = distributed.current_dist_info(device)
    parameters = model.trainable_parameters()
    if not parameters:
        raise ValueError("the CAPT model has no trainable parameters; enable the adapter, MGDE or both")
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    # Loss scaling keeps small fp16 gradients from flushing to zero. A disabled scaler passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    state = {"epoch": 0, "history": [], "best_epoch": 0, "best_val_accuracy": -1.0, "best_weights": None}
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    if checkpoint is not None and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, config)
        logger.info("resuming CAPT training from %s after epoch %d", checkpoint, state["epoch"])
    forward_model = distributed.wrap_model(model, dist_info)  # ``model`` itself for one process

    step = _Step(forward_model, optimizer, scheduler, scaler, precision, dist_info)

    epochs = range(state["epoch"], config.epochs)
    progress = tqdm(epochs, desc="CAPT epochs", leave=False, disable=None if dist_info.is_main else True)
    for epoch in progress:
        row = _train_one_epoch(model, step, train, config, epoch, device)
        row["val_accuracy"] = evaluate_accuracy(model, val, device)
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if row["val_accuracy"] > state["best_val_accuracy"]:
            state["best_val_accuracy"] = row["val_accuracy"]
            state["best_epoch"] = epoch + 1
            state["best_weights"] = _trainable_state(model)
        progress.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row['val_accuracy']:.1f}")

        if checkpoint is not None and dist_info.is_main:
            _save_checkpoint(checkpoint, model, optimizer, scheduler, scaler, config, state)
        distributed.barrier(dist_info)  # no rank runs ahead of a checkpoint that is still being written
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break

    if state["best_weights"] is not None:
        model.load_state_dict(state["best_weights"], strict=False)
    return CAPTTrainResult(state["history"], state["best_epoch"], state["best_val_accuracy"])


@dataclass
class _Step:
    """Objects of one optimisation step other than the data: model, optimiser, scheduler, scaler."""

    forward_model: torch.nn.Module  # the CAPT model, wrapped in DDP in a distributed run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # loss scaler, enabled for fp16 only
    precision: str  # resolved autocast precision
    dist_info: distributed.DistInfo  # this process's rank and the world size


def _train_one_epoch(model, step: _Step, train, config, epoch, device) -> dict:
    model.train()
    # Every rank draws the same order, then runs its own part of each global batch.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    sam_generator = torch.Generator().manual_seed(config.seed * 100_019 + epoch)
    totals = {"loss": 0.0, "L_ori": 0.0, "L_confuse": 0.0, "correct": 0}

    for start in range(0, len(train), config.batch_size):
        shard = distributed.shard_batch(order[start : start + config.batch_size], step.dist_info)
        rows = shard.rows
        batch_size = len(rows)
        confusing_rows = _retrieve_confusing_rows(model, train, rows, sam_generator, device)

        # One forward pass over the batch and its retrieved confusing images.
        all_rows = torch.cat([rows, confusing_rows])  # (B + R,)
        labels = train.labels[all_rows].to(device)  # (B + R,)
        with autocast(device, step.precision):
            output = step.forward_model(**train.batch(all_rows, device))
            loss, parts = capt_loss(
                output.logits[:batch_size],
                labels[:batch_size],
                output.features,
                labels,
                model.class_text_features,
                config.lam,
                config.temperature,
            )
            if output.router_probs is not None and config.load_balance > 0:
                loss = loss + config.load_balance * load_balancing_loss(output.router_probs, output.expert_mask)

        # NOTE: L_confuse and the load-balancing loss of a distributed run cover each rank's rows
        # only, so only L_ori reproduces a single-process run exactly.
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(loss * shard.loss_weight).backward()  # loss_weight is 1.0 for one process
        step.scaler.step(step.optimizer)
        step.scaler.update()
        step.scheduler.step()

        # Metrics count this rank's own rows, so a borrowed placeholder row (num_own 0) adds nothing.
        correct = (output.logits[:batch_size].argmax(dim=1) == labels[:batch_size]).sum().item()
        totals["loss"] += loss.item() * shard.num_own
        totals["L_ori"] += parts["L_ori"].item() * shard.num_own
        totals["L_confuse"] += parts["L_confuse"].item() * shard.num_own
        totals["correct"] += correct if shard.num_own else 0

    totals = distributed.all_reduce_sums(totals, step.dist_info)
    n = len(train)
    return {
        "epoch": epoch + 1,
        "loss": totals["loss"] / n,
        "L_ori": totals["L_ori"] / n,
        "L_confuse": totals["L_confuse"] / n,
        "train_accuracy": 100.0 * totals["correct"] / n,
    }


def _retrieve_confusing_rows(model, train, rows, generator, device) -> torch.Tensor:
    """Training-split rows of the confusing images SAM retrieves for a batch (R,), maybe empty.

    SEM needs only the frozen features, so the pairs are mined before the forward pass
    and the retrieved images join the batch in a single pass.
    """
    if model.sam is None:
        return rows.new_zeros(0)

    base_features = train.features[rows].to(device)
    with torch.no_grad():
        mined = model.sem(model.base_probabilities(base_features))
    retrieved = model.sam.retrieve(
        base_features,
        mined.pseudo_labels,
        mined.pair_classes,
        query_sample_ids=train.sample_ids[rows].to(device),
        generator=generator,
    )  # (B, k) bank rows, -1 where a pair has no confused image
    bank_rows = retrieved[retrieved >= 0].unique()
    if len(bank_rows) == 0:
        return rows.new_zeros(0)

    # The bank is built over the training split, so its sample ids name training rows.
    return rows_of_sample_ids(
        train.sample_ids,
        model.sam.sample_ids[bank_rows].cpu(),
        "the Confusion Bank names images that are not in the training split; rebuild the bank",
    )


def rows_of_sample_ids(all_ids: torch.Tensor, requested: torch.Tensor, missing_message: str) -> torch.Tensor:
    """Find the row of ``all_ids`` that contains each id of ``requested``.

    An id that ``all_ids`` lacks raises ValueError with ``missing_message``.
    """
    order = torch.argsort(all_ids)
    positions = torch.searchsorted(all_ids[order], requested)
    positions = positions.clamp(max=len(all_ids) - 1)
    rows = order[positions]
    if not torch.equal(all_ids[rows], requested):
        raise ValueError(missing_message)
    return rows


@torch.no_grad()
def predict_logits(model: CAPTModel, split: SplitTensors, device: torch.device | None = None, batch_size: int = 512) -> torch.Tensor:
    """Final logits (N, C) for a whole split, in batches, in eval mode."""
    device = device or model.logit_scale.device
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(split), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(split)))
        chunks.append(model(**split.batch(rows, device)).logits.cpu())
    model.train(was_training)
    return torch.cat(chunks)


def evaluate_accuracy(model: CAPTModel, split: SplitTensors, device: torch.device | None = None) -> float:
    logits = predict_logits(model, split, device)
    return 100.0 * (logits.argmax(dim=1) == split.labels).float().mean().item()


def _trainable_state(model: CAPTModel) -> dict[str, torch.Tensor]:
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value.detach().clone() for name, value in model.state_dict().items() if name in names}


def _save_checkpoint(path: Path, model, optimizer, scheduler, scaler, config, state) -> None:
    payload = {
        "config": asdict(config),
        "model_config": asdict(model.config),
        "model": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),  # empty unless fp16 loss scaling is on
        "epoch": state["epoch"],
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "best_val_accuracy": state["best_val_accuracy"],
        "best_weights": state["best_weights"],
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _load_checkpoint(path: Path, model, optimizer, scheduler, scaler, config) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file; torch raises several types
        raise RuntimeError(f"cannot read the CAPT checkpoint {path}: {e}; delete it to start over") from e
    for key, current in (("config", asdict(config)), ("model_config", asdict(model.config))):
        if payload[key] != current:
            raise ValueError(
                f"the checkpoint {path} was written with other settings ({key}={payload[key]}); "
                f"current settings are {current}. Use another checkpoint folder or delete it"
            )
    model.load_state_dict(payload["model"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    return {key: payload[key] for key in ("epoch", "history", "best_epoch", "best_val_accuracy", "best_weights")}
