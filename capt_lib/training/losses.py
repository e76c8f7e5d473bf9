"""CAPT training losses: L = L_ori + lambda * L_confuse.

L_ori is the cross-entropy of the final logits. L_confuse is a symmetric InfoNCE between a
set of images and the text features of the classes present in that set. The set is the
batch plus the confused images that the Sample Confusion Miner retrieved, so the loss
pushes confusable classes apart at the level of single images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_info_nce(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    class_text_features: torch.Tensor,
    temperature: float | torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE between images and the text features of the classes present among them.

    Both feature sets are L2-normalised, and the logits are cosines divided by
    ``temperature``. Only the P classes that occur in ``labels`` take part.

    - image -> text: for each of the M images, cross-entropy over the P present classes,
      the target being the image's own class. Averaged over the images.
    - text -> image: for each present class, a softmax over the M images whose target is
      uniform over the images of that class (multi-positive, as a class may have several
      images in the set). Averaged over the classes.

    The loss is the mean of the two directions.

    Args:
        image_features: (M, E) image features.
        labels: (M,) true class of each image, in [0, C).
        class_text_features: (C, E) text features of all classes.
        temperature: positive scalar; CLIP's logit scale is 1 / temperature.
    """
    _check_contrastive_inputs(image_features, labels, class_text_features, temperature)

    present, targets = torch.unique(labels, return_inverse=True)  # (P,), (M,) index into present
    images = F.normalize(image_features, dim=-1)  # (M, E)
    texts = F.normalize(class_text_features[present], dim=-1)  # (P, E)
    logits = images @ texts.T / temperature  # (M, P)

    image_to_text = F.cross_entropy(logits, targets)

    positives = F.one_hot(targets, len(present)).T.to(logits.dtype)  # (P, M), 1 where image m is of class p
    positives = positives / positives.sum(dim=1, keepdim=True)  # uniform target over each class's images
    text_to_image = -(positives * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()

    return (image_to_text + text_to_image) / 2


def capt_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    confuse_features: torch.Tensor,
    confuse_labels: torch.Tensor,
    class_text_features: torch.Tensor,
    lam: float,
    temperature: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total CAPT loss ``L_ori + lam * L_confuse`` and its detached parts.

    Args:
        logits: (B, C) final logits of the batch.
        labels: (B,) true labels of the batch.
        confuse_features: (M, E) features of the batch images and their retrieved confused
            images, for L_confuse.
        confuse_labels: (M,) true labels of those images.
        class_text_features: (C, E) text features of the classes that ``logits`` score.
        lam: weight lambda of L_confuse, non-negative. L_confuse is computed and reported
            even when lam is 0.
        temperature: temperature of L_confuse (see ``symmetric_info_nce``).

    Returns:
        ``(total, {"L_ori": ..., "L_confuse": ...})``, the parts detached for logging.
    """
    if lam < 0:
        raise ValueError(f"capt_loss: lam={lam} must be non-negative")
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"capt_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have shapes (B, C) and (B,)"
        )
    if logits.shape[1] != class_text_features.shape[0]:
        raise ValueError(
            f"capt_loss: logits score {logits.shape[1]} classes but class_text_features has "
            f"{class_text_features.shape[0]} rows; both must cover the same classes"
        )

    loss_ori = F.cross_entropy(logits, labels)
    loss_confuse = symmetric_info_nce(confuse_features, confuse_labels, class_text_features, temperature)
    total = loss_ori + lam * loss_confuse
    return total, {"L_ori": loss_ori.detach(), "L_confuse": loss_confuse.detach()}


def _check_contrastive_inputs(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    class_text_features: torch.Tensor,
    temperature: float | torch.Tensor,
) -> None:
    if image_features.ndim != 2 or image_features.shape[0] == 0:
        raise ValueError(
            f"symmetric_info_nce: image_features has shape {tuple(image_features.shape)}; expected (M, E) with M > 0"
        )
    if labels.shape != image_features.shape[:1] or labels.is_floating_point():
        raise ValueError(
            f"symmetric_info_nce: labels must be an integer tensor of shape ({image_features.shape[0]},); "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if class_text_features.ndim != 2 or class_text_features.shape[1] != image_features.shape[1]:
        raise ValueError(
            f"symmetric_info_nce: class_text_features has shape {tuple(class_text_features.shape)}; "
            f"expected (C, {image_features.shape[1]}) to match the image features"
        )
    num_classes = class_text_features.shape[0]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"symmetric_info_nce: labels must lie in [0, {num_classes}); "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    temperature = float(temperature.detach()) if isinstance(temperature, torch.Tensor) else float(temperature)
    if temperature <= 0:
        raise ValueError(f"symmetric_info_nce: temperature={temperature} must be positive")
