"""CoOp training on cached image features.

The image encoder is frozen and gets no augmentation here, so the caller computes its
features once. A training step then only runs the text tower: the class prompts
are re-encoded with the current context, and gradients reach ``ctx`` alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from capt_lib.backbones.base import Backbone
from capt_lib.prompts.coop import CLASS_TOKEN_POSITIONS, CoOpModel, PromptLearner
from capt_lib.utils.device import PRECISIONS, autocast, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
# Context selection rules of train_coop, named after Dassl's TEST.FINAL_MODEL values.
FINAL_MODELS = ("last_step", "best_val")


@dataclass(frozen=True)
class CoOpConfig:
    """CoOp settings. The SGD defaults follow CoOp's ViT configs with Dassl's defaults."""

    n_ctx: int = 4  # learned context tokens; replaced by ctx_init's token count when ctx_init is set
    ctx_init: str | None = "a photo of a"  # text whose embeddings start the context; None for random
    csc: bool = False  # class-specific context (one ctx per class) instead of one shared ctx
    class_token_position: str = "end"  # where the class name sits in the prompt; only "end" is implemented
    epochs: int = 200  # passes over the training features (CoOp vit_b16.yaml, 8 and 16 shots)
    batch_size: int = 32  # image features per step
    optimizer: str = "sgd"  # "sgd" (momentum, as CoOp) or "adamw"
    lr: float = 0.002  # peak learning rate, annealed to 0 by a cosine schedule over the epochs
    momentum: float = 0.9  # SGD momentum; ignored by AdamW
    weight_decay: float = 5e-4  # L2 penalty on ctx (SGD) or decoupled weight decay (AdamW)
    warmup_epochs: int = 1  # epochs at the constant warmup_lr before the cosine schedule starts
    warmup_lr: float = 1e-5  # learning rate during warmup
    seed: int = 0  # seeds the random context initialisation and the shuffling
    # "last_step" keeps the context after the last epoch (Dassl's default, which CoOp uses);
    # "best_val" keeps the first epoch with the highest validation accuracy. A few-shot
    # val split has few images (4 per class), so best_val tends to stop on an early epoch.
    final_model: str = "last_step"
    precision: str = "fp32"  # autocast dtype of training steps: "fp32", "bf16" or "fp16" (fp32 on a CPU)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"CoOpConfig.precision={self.precision!r} is invalid; choose one of {sorted(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"CoOpConfig.optimizer={self.optimizer!r} is invalid; choose one of {list(OPTIMIZERS)}")
        if self.final_model not in FINAL_MODELS:
            raise ValueError(f"CoOpConfig.final_model={self.final_model!r} is invalid; choose one of {list(FINAL_MODELS)}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"CoOpConfig.class_token_position={self.class_token_position!r} is invalid; choose one of "
                f"{list(CLASS_TOKEN_POSITIONS)}"
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CoOpConfig.{name}={getattr(self, name)} is invalid; it must be at least 1")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"CoOpConfig.warmup_epochs={self.warmup_epochs} is invalid; it must lie in [0, epochs={self.epochs})"
            )
        if self.lr <= 0 or self.warmup_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"CoOpConfig has an invalid lr={self.lr}, warmup_lr={self.warmup_lr} or "
                f"weight_decay={self.weight_decay}; lr must be positive, the others non-negative"
            )


def epoch_learning_rate(cfg: CoOpConfig, epoch: int) -> float:
    """Return the learning rate of 0-based ``epoch``: constant warmup, then cosine from lr to 0."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    progress = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))


def train_coop(
    backbone: Backbone,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    classnames: list[str] | tuple[str, ...],
    cfg: CoOpConfig = CoOpConfig(),
    *,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> tuple[CoOpModel, list[dict]]:
    """Train CoOp context on cached image features (N, E) with labels (N,) in [0, C).

    Features need not be normalised, because the model normalises them. The returned
    model has the context after the last epoch, unless ``cfg.final_model`` is
    "best_val": then it keeps the context of the first epoch with the highest validation
    accuracy, which needs validation data.
    ``device`` defaults to the backbone's. A different device moves the whole backbone
    model there, which changes the caller's ``backbone`` too.

    Returns the model in eval mode and one history entry per epoch: epoch (1-based),
    lr, loss and train_accuracy (means over the epoch's batches, measured while the
    context changed), and val_accuracy when validation data is given.
    """
    classnames = tuple(classnames)
    train_features, train_labels = _check_split("train", train_features, train_labels, backbone, len(classnames))
    has_val = _check_val_given(val_features, val_labels)
    if has_val:
        val_features, val_labels = _check_split("val", val_features, val_labels, backbone, len(classnames))
    elif cfg.final_model == "best_val":
        raise ValueError('CoOpConfig.final_model="best_val" needs val_features and val_labels')

    device = backbone.device if device is None else resolve_device(device)
    if device != backbone.device:
        logger.info("moving the backbone from %s to %s for CoOp training", backbone.device, device)
        backbone.model.to(device)

    prompt_learner = PromptLearner(
        backbone,
        classnames,
        n_ctx=cfg.n_ctx,
        ctx_init=cfg.ctx_init,
        class_token_position=cfg.class_token_position,
        csc=cfg.csc,
        seed=cfg.seed,
    )
    model = CoOpModel(backbone, prompt_learner).to(device)
    optimizer = _build_optimizer(cfg, model.trainable_parameters())
    precision = resolve_precision(cfg.precision, device)
    # Loss scaling keeps small fp16 gradients from flushing to zero. A disabled scaler passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed)
    train_features, train_labels = train_features.to(device), train_labels.to(device)
    if has_val:
        val_features, val_labels = val_features.to(device), val_labels.to(device)

    history = []
    best_accuracy, best_ctx = -1.0, None
    for epoch in tqdm(range(cfg.epochs), desc="CoOp epochs"):
        lr = epoch_learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        record = {"epoch": epoch + 1, "lr": lr}
        record.update(
            _train_one_epoch(model, optimizer, scaler, precision, train_features, train_labels, cfg.batch_size, generator)
        )

        if has_val:
            record["val_accuracy"] = evaluate_accuracy(model, val_features, val_labels)
            if cfg.final_model == "best_val" and record["val_accuracy"] > best_accuracy:
                best_accuracy = record["val_accuracy"]
                best_ctx = prompt_learner.ctx.detach().clone()
        history.append(record)

    if best_ctx is not None:
        with torch.no_grad():
            prompt_learner.ctx.copy_(best_ctx)
        best_epoch = next(r["epoch"] for r in history if r["val_accuracy"] == best_accuracy)
        logger.info("keeping the context of epoch %d (val accuracy %.4f)", best_epoch, best_accuracy)
    return model.eval(), history


@torch.no_grad()
def evaluate_accuracy(model: CoOpModel, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the top-1 accuracy of ``model`` on cached image features (N, E) with labels (N,)."""
    was_training = model.training
    model.eval()
    predictions = model.logits(features).argmax(dim=-1)  # (N,)
    model.train(was_training)
    return float((predictions == labels).float().mean())


def _train_one_epoch(
    model: CoOpModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> dict:
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(labels.device)  # (N,)
    total_loss, total_correct = 0.0, 0

    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        with autocast(features.device, precision):
            logits = model.logits(features[batch])  # (B, C); the prompts are re-encoded every step
            loss = F.cross_entropy(logits, labels[batch])

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        total_loss += loss.item() * len(batch)
        total_correct += int((logits.argmax(dim=-1) == labels[batch]).sum())

    return {"loss": total_loss / len(order), "train_accuracy": total_correct / len(order)}


def _build_optimizer(cfg: CoOpConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_val_given(val_features: torch.Tensor | None, val_labels: torch.Tensor | None) -> bool:
    if (val_features is None) != (val_labels is None):
        raise ValueError("pass both val_features and val_labels, or neither")
    return val_features is not None


def _check_split(
    split: str, features: torch.Tensor, labels: torch.Tensor, backbone: Backbone, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one split's cached features and labels; return them as float32 and int64 tensors."""
    features = torch.as_tensor(features).float()
    labels = torch.as_tensor(labels).long()
    if features.dim() != 2 or features.shape[1] != backbone.embed_dim:
        raise ValueError(
            f"{split}_features has shape {tuple(features.shape)}; expected (N, {backbone.embed_dim}), "
            "the backbone's image embeddings"
        )
    if labels.shape != (features.shape[0],):
        raise ValueError(f"{split}_labels has shape {tuple(labels.shape)}; expected ({features.shape[0]},)")
    if len(labels) == 0:
        raise ValueError(f"{split}_features is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{split}_labels lie in [{int(labels.min())}, {int(labels.max())}] but there are {num_classes} "
            f"classnames; labels must lie in [0, {num_classes})"
        )
    return features, labels
