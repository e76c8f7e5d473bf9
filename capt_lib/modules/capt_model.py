"""The CAPT model: frozen CLIP plus the Diff-Manner Adapter, SEM context and MGDE.

One forward pass for a batch of B images, with C classes, ViT width W and embedding E:

1. The frozen base model scores the image's frozen features ``f0`` (B, E) against its
   class text features: probabilities C_i and pseudo label p.
2. The Semantic Confusion Miner (SEM) turns those probabilities and the Confusion Bank's
   counts into confusion pairs (p, i), the confusion intensity c and a semantic context
   (the mean commonality/difference prompt feature of the pairs).
3. The Diff-Manner Adapter adapts the last-block tokens (B, 1 + HW, W) with weight
   ``alpha = s * c**gamma``. With ``placement="in_blocks"`` it runs inside chosen ViT
   blocks instead, so the images go through the frozen backbone at every step.
4. The class token is pooled with the visual ``ln_post``; MGDE adds its routed expert
   residual in width space, routing on the pooled token and the semantic context.
5. The result is projected with the visual ``proj``, L2-normalised and scored against
   the class text features with CLIP's logit scale.

Every CAPT module starts as the identity, so an untrained CAPT model reproduces the
base model's predictions.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from capt_lib.backbones.base import Backbone
from capt_lib.confusion.bank import ConfusionBank
from capt_lib.confusion.sample_miner import SAMConfig, SampleConfusionMiner
from capt_lib.confusion.semantic_miner import SEMConfig, SemanticConfusionMiner
from capt_lib.modules.adapter import DiffMannerAdapter, DiffMannerAdapterConfig, attach_adapters
from capt_lib.modules.mgde import MGDE, MGDEConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CAPTConfig:
    """Settings of the CAPT model: the modules that run and the configuration of each."""

    use_adapter: bool = True  # run the Diff-Manner Adapter
    use_mgde: bool = True  # run MGDE
    pool_local: bool = True  # after the last block, add the mean patch-token update to the class token
    sem: SEMConfig = field(default_factory=SEMConfig)  # Semantic Confusion Miner settings
    sam: SAMConfig = field(default_factory=SAMConfig)  # Sample Confusion Miner settings (training only)
    adapter: DiffMannerAdapterConfig = field(default_factory=lambda: DiffMannerAdapterConfig(heads=4, bottleneck=64))
    mgde: MGDEConfig = field(default_factory=MGDEConfig)  # MGDE settings


@dataclass
class CAPTOutput:
    """Result of a CAPT forward pass for B images and C classes."""

    logits: torch.Tensor  # (B, C) final logits
    features: torch.Tensor  # (B, E) L2-normalised adapted image features
    base_probs: torch.Tensor  # (B, C) base-model probabilities that fed SEM
    pseudo_labels: torch.Tensor  # (B,) base-model top-1 classes
    pair_classes: torch.Tensor  # (B, k) SEM partner classes of each image
    intensity: torch.Tensor  # (B,) confusion intensity c
    router_probs: torch.Tensor | None  # (B, n_experts) MGDE router softmax, None without MGDE
    expert_mask: torch.Tensor | None  # (B, n_experts) experts each image was routed to


class CAPTModel(nn.Module):
    """CAPT on a frozen open_clip ViT, for one label space.

    Args:
        backbone: the frozen CLIP backbone (a ViT with class-token pooling).
        base_text_features: (C, E) class text features of the base model (zero-shot or
            tuned prompts), frozen; they produce the pseudo labels and probabilities SEM reads.
        bank: the Confusion Bank of the base model over the training split, or None when
            no bank exists for these classes (novel classes: counts fall back to zero and
            SAM is off).
        commonality, difference: (C, C, E) pair prompt features from
            ``capt_lib.confusion.semantic_miner.encode_pair_prompts``.
        config: which modules run.
        class_text_features: (C, E) text features of the final classifier; the base
            model's by default.
    """

    def __init__(
        self,
        backbone: Backbone,
        base_text_features: torch.Tensor,
        bank: ConfusionBank | None,
        commonality: torch.Tensor,
        difference: torch.Tensor,
        config: CAPTConfig = CAPTConfig(),
        class_text_features: torch.Tensor | None = None,
    ):
        super().__init__()
        visual = backbone.model.visual
        _check_supported_visual(visual)
        num_classes = base_text_features.shape[0]
        if bank is not None and bank.num_classes != num_classes:
            raise ValueError(
                f"the Confusion Bank has {bank.num_classes} classes but the base model scores {num_classes}; "
                "build the bank over the same label space"
            )

        self.config = config
        self.width = visual.transformer.width
        self.grid_size = visual.grid_size
        self.placement = config.adapter.placement
        self._backbone = backbone  # not a submodule: its weights stay frozen and out of state_dict

        self.register_buffer("base_text_features", F.normalize(base_text_features.detach().float(), dim=-1))
        text = base_text_features if class_text_features is None else class_text_features
        self.register_buffer("class_text_features", F.normalize(text.detach().float(), dim=-1))
        self.register_buffer("logit_scale", backbone.model.logit_scale.detach().exp().float())
        self.register_buffer("proj", visual.proj.detach().float().clone())  # (W, E)
        self.ln_post = _frozen_copy(visual.ln_post)

        counts = None if bank is None else bank.counts
        self.sem = SemanticConfusionMiner(counts, commonality, difference, config.sem)
        self.sam = None
        if bank is not None and config.sam.mode != "none":
            self.sam = SampleConfusionMiner(
                bank.features, bank.true_labels, bank.pseudo_labels, bank.sample_ids, bank.num_classes, config.sam
            )

        self.adapter = None
        self.adapter_hooks = None
        if config.use_adapter and self.placement == "after_last_block":
            self.adapter = DiffMannerAdapter(self.width, self.grid_size, config.adapter)
        elif config.use_adapter:
            self.adapter_hooks = attach_adapters(visual, config.adapter.blocks, config.adapter)

        self.mgde = None
        if config.use_mgde and config.mgde.experts != "none":
            semantic = self._semantic_width_features(commonality, difference)
            self.mgde = MGDE(
                _fit_centres(config.mgde, len(semantic)),
                self.width,
                context_dim=self.width,
                semantic_features=semantic,
                clip_mlp=visual.transformer.resblocks[-1].mlp,
            )

    @property
    def needs_images(self) -> bool:
        """True when the adapter sits inside the ViT, so cached tokens cannot be used."""
        return self.adapter_hooks is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def base_probabilities(self, base_features: torch.Tensor) -> torch.Tensor:
        """Base-model probabilities (B, C) from frozen image features (B, E)."""
        features = F.normalize(base_features.float(), dim=-1)
        return (self.logit_scale * features @ self.base_text_features.T).softmax(dim=-1)

    def forward(
        self,
        base_features: torch.Tensor,
        tokens: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> CAPTOutput:
        """Classify a batch from its frozen features (B, E) and its last-block tokens or images.

        ``tokens`` (B, 1 + HW, W) are required with the after-last-block placement,
        ``images`` (B, 3, H, W) with the in-block placement.
        """
        base_probs = self.base_probabilities(base_features)  # (B, C)
        mined = self.sem(base_probs)

        pooled = self._pooled_token(tokens, images, mined.intensity)  # (B, W)

        router_probs = expert_mask = None
        if self.mgde is not None:
            context = mined.context.float() @ self.proj.T  # (B, E) -> (B, W)
            routed = self.mgde(pooled, context)
            pooled, router_probs, expert_mask = routed.output, routed.router_probs, routed.expert_mask

        features = F.normalize(pooled @ self.proj, dim=-1)  # (B, E)
        logits = self.logit_scale * features @ self.class_text_features.T  # (B, C)
        return CAPTOutput(
            logits, features, base_probs, mined.pseudo_labels, mined.pair_classes, mined.intensity, router_probs, expert_mask
        )

    def _pooled_token(self, tokens, images, intensity) -> torch.Tensor:
        if self.needs_images:
            if images is None:
                raise ValueError("CAPTModel: the in-block adapter placement needs images, got none")
            self.adapter_hooks.intensity = intensity
            tokens = self._backbone.visual_tokens(images)  # (B, 1 + HW, W), adapters run inside the blocks
            return self.ln_post(tokens[:, 0].float())

        if tokens is None:
            raise ValueError("CAPTModel: the after-last-block placement needs the cached last-block tokens, got none")
        tokens = tokens.float()
        if self.adapter is None:
            return self.ln_post(tokens[:, 0])

        adapted = self.adapter(tokens, intensity)  # (B, 1 + HW, W)
        class_token = adapted[:, 0]  # (B, W)
        if self.config.pool_local:
            # Only the class token is pooled after the last block, so the local branch's
            # patch updates reach the prediction through their mean.
            class_token = class_token + (adapted[:, 1:] - tokens[:, 1:]).mean(dim=1)
        return self.ln_post(class_token)

    def _semantic_width_features(self, commonality: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
        """Distinct off-diagonal prompt features mapped into width space: (M, W)."""
        num_classes = commonality.shape[0]
        off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=commonality.device)
        features = torch.cat([commonality[off_diagonal], difference[off_diagonal]]).float()  # (2*C*(C-1), E)
        features = torch.unique(features, dim=0)  # the commonality of (a, b) equals that of (b, a)
        return features.to(self.proj.device) @ self.proj.T  # (M, W)


def _fit_centres(config: MGDEConfig, num_features: int) -> MGDEConfig:
    """Shrink the K-means centres per semantic expert when there are too few prompt features."""
    if config.num_semantic == 0:
        return config
    max_centres = num_features // config.num_semantic
    if max_centres < 1:
        raise ValueError(
            f"MGDE needs at least {config.num_semantic} distinct prompt features for "
            f"{config.num_semantic} semantic experts, got {num_features}"
        )
    if config.n_centres <= max_centres:
        return config
    warnings.warn(
        f"MGDEConfig.n_centres={config.n_centres} needs {config.n_centres * config.num_semantic} prompt features "
        f"but only {num_features} exist; using n_centres={max_centres}",
        stacklevel=3,
    )
    import dataclasses

    return dataclasses.replace(config, n_centres=max_centres)


def _frozen_copy(module: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(module).float()
    clone.requires_grad_(False)
    return clone


def _check_supported_visual(visual: nn.Module) -> None:
    """Raise unless ``visual`` is an open_clip ViT that pools its class token through ln_post."""
    pool_type = getattr(visual, "pool_type", None)
    if getattr(visual, "attn_pool", None) is not None or pool_type != "tok" or getattr(visual, "final_ln_after_pool", False):
        raise ValueError(
            f"CAPTModel supports open_clip ViTs with class-token pooling (pool_type='tok', no attention pooling); "
            f"got {type(visual).__name__} with pool_type={pool_type!r}"
        )
    if getattr(visual, "proj", None) is None:
        raise ValueError("CAPTModel needs a ViT with an output projection (visual.proj), found none")
