"""Zero-shot CLIP classification: class text features from hand-crafted templates."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from capt_lib.backbones.base import Backbone
from capt_lib.prompts.templates import fill_templates, validate_templates

logger = logging.getLogger(__name__)


@torch.no_grad()
def build_text_classifier(
    backbone: Backbone,
    classnames: list[str] | tuple[str, ...],
    templates: list[str] | tuple[str, ...],
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Build the zero-shot weights: (C, embed_dim), one L2-normalised row per class.

    Each row is the mean of the L2-normalised text features of the class's filled
    templates, normalised again (the prompt ensemble of Radford et al., 2021). Texts are
    encoded ``chunk_size`` at a time, so the text tower's memory does not grow with the
    number of classes or templates.
    """
    classnames = list(classnames)
    templates = validate_templates(templates)
    if not classnames:
        raise ValueError("classnames is empty; the zero-shot classifier needs at least one class")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid; it must be at least 1")

    texts = [text for name in classnames for text in fill_templates(templates, name)]  # class-major order
    owners = torch.arange(len(classnames)).repeat_interleave(len(templates))  # (C*T,) class of each text
    logger.info("building a zero-shot classifier: %d classes x %d templates", len(classnames), len(templates))

    sums = torch.zeros(len(classnames), backbone.embed_dim, device=backbone.device)  # (C, E)
    starts = range(0, len(texts), chunk_size)
    for start in tqdm(starts, desc="zero-shot text features", leave=False, disable=len(starts) <= 1):
        features = backbone.encode_text(texts[start : start + chunk_size], normalize=True).float()  # (chunk, E)
        sums.index_add_(0, owners[start : start + chunk_size].to(sums.device), features)

    # The mean and the sum of the template features point the same way, so normalising the sum suffices.
    return F.normalize(sums, dim=-1)  # (C, E)


class ZeroShotClassifier(nn.Module):
    """Frozen CLIP with a template-built text classifier.

    ``weights`` (C, embed_dim) and ``logit_scale`` are buffers, so they move with
    ``.to(device)``. Logits are ``logit_scale * normalize(f) @ weights.T`` (plus the
    model's ``logit_bias`` when it has one), as in ``CLIP.get_logits``.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str] | tuple[str, ...],
        templates: list[str] | tuple[str, ...],
        *,
        chunk_size: int = 256,
    ):
        super().__init__()
        self.classnames = tuple(classnames)
        self.templates = validate_templates(templates)

        weights = build_text_classifier(backbone, self.classnames, self.templates, chunk_size=chunk_size)
        self.register_buffer("weights", weights)  # (C, E)
        self.register_buffer("logit_scale", backbone.model.logit_scale.detach().exp().float())  # () or (1,)
        logit_bias = getattr(backbone.model, "logit_bias", None)
        self.register_buffer("logit_bias", None if logit_bias is None else logit_bias.detach().float())

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Score image features (B, E) against every class: (B, C).

        The features are L2-normalised here, so raw ``encode_image`` outputs work too.
        """
        if image_features.dim() != 2 or image_features.shape[1] != self.weights.shape[1]:
            raise ValueError(
                f"image_features has shape {tuple(image_features.shape)}; expected (B, {self.weights.shape[1]})"
            )
        features = F.normalize(image_features.float(), dim=-1)  # (B, E)
        logits = self.logit_scale * features @ self.weights.T  # (B, C)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features)
