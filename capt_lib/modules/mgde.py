"""MGDE, the Multi-Granularity Discrepancy Expert: a sparse mixture of experts on the pooled image feature.

MGDE adds a residual to the pooled class token (B, width), after the visual ``ln_post``
and before the visual projection:

    output = x + sum over the router's top-k experts e of r_e * expert_e(x)

There are two kinds of experts, so the fused feature draws on both granularities of the
confusion:

- Semantic experts are bottlenecks (width -> n_centres -> width). Their down-projection rows
  start at K-means centres of the commonality and difference prompt features, which the
  caller maps into width space first. The x @ centre products measure how far the image
  leans towards each discriminative text direction.
- Sample experts are trainable copies of the CLIP ViT's last-block MLP, so they start from
  a transform that already suits visual features.

Every expert's output is zero at initialisation (zero up-projection or zero gate), so MGDE
is exactly the identity at step 0. As in LoRA, this means that the down-projections and the
copied MLP weights get a zero gradient on the first step. They start to learn once the
zero-initialised up-projections and gates have moved.

The router reads ``[x ; context]``, where the context is the image's semantic context (the
SEM prompt features of its confusion pairs, mapped by the caller to ``context_dim``). It
keeps the top-k softmax weights per sample and renormalises them to sum to one.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from capt_lib.modules.kmeans import kmeans

logger = logging.getLogger(__name__)

EXPERT_SETS = ("both", "semantic", "sample", "none")


@dataclass(frozen=True)
class MGDEConfig:
    """Settings of MGDE. The defaults give three experts with top-2 routing."""

    n_semantic_experts: int = 2  # experts whose down-projection starts at prompt-feature K-means centres
    n_sample_experts: int = 1  # experts that start as copies of the CLIP ViT's last-block MLP
    n_centres: int = 8  # K-means centres per semantic expert, i.e. its bottleneck size
    top_k: int = 2  # experts each sample is routed to, clamped to the number of experts
    router_noise: float = 0.0  # std of Gaussian noise on the router logits, in training mode only
    experts: str = "both"  # which experts exist: "both", "semantic", "sample", or "none" (MGDE is the identity)
    kmeans_seed: int = 0  # seed of the k-means++ initialisation over the prompt features

    def __post_init__(self) -> None:
        if self.experts not in EXPERT_SETS:
            raise ValueError(f"MGDEConfig.experts={self.experts!r} is invalid, choose one of {list(EXPERT_SETS)}")
        for name in ("n_semantic_experts", "n_sample_experts"):
            if getattr(self, name) < 0:
                raise ValueError(f"MGDEConfig.{name}={getattr(self, name)} is invalid, it must be >= 0")
        if self.experts in ("both", "semantic") and self.n_semantic_experts < 1:
            raise ValueError(
                f"MGDEConfig: experts={self.experts!r} needs n_semantic_experts >= 1, got "
                f"{self.n_semantic_experts}. Use experts='sample' for sample experts only"
            )
        if self.experts in ("both", "sample") and self.n_sample_experts < 1:
            raise ValueError(
                f"MGDEConfig: experts={self.experts!r} needs n_sample_experts >= 1, got "
                f"{self.n_sample_experts}. Use experts='semantic' for semantic experts only"
            )
        if self.n_centres < 1:
            raise ValueError(f"MGDEConfig.n_centres={self.n_centres} is invalid, it must be >= 1")
        if self.top_k < 1:
            raise ValueError(f"MGDEConfig.top_k={self.top_k} is invalid, it must be >= 1")
        if self.router_noise < 0:
            raise ValueError(f"MGDEConfig.router_noise={self.router_noise} is invalid, it must be >= 0")

    @property
    def num_semantic(self) -> int:
        """Number of semantic experts that exist under the ``experts`` setting."""
        return self.n_semantic_experts if self.experts in ("both", "semantic") else 0

    @property
    def num_sample(self) -> int:
        """Number of sample experts that exist under the ``experts`` setting."""
        return self.n_sample_experts if self.experts in ("both", "sample") else 0


@dataclass(frozen=True)
class MGDEOutput:
    """Result of one MGDE forward pass. Experts are ordered semantic first, then sample."""

    output: torch.Tensor  # (B, width) x plus the routed expert residual
    router_weights: torch.Tensor  # (B, n_experts) top-k softmax weights renormalised to sum to one, zero elsewhere
    router_probs: torch.Tensor  # (B, n_experts) full router softmax, for load_balancing_loss
    expert_mask: torch.Tensor  # (B, n_experts) bool, True for the experts each sample was routed to


class SemanticExpert(nn.Module):
    """Bottleneck width -> n_centres -> width whose down-projection rows start at K-means centres."""

    def __init__(self, centres: torch.Tensor) -> None:
        super().__init__()
        n_centres, width = centres.shape
        self.down = nn.Linear(width, n_centres)
        self.act = nn.GELU()
        self.up = nn.Linear(n_centres, width)

        with torch.no_grad():
            self.down.weight.copy_(centres)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class SampleExpert(nn.Module):
    """Trainable float32 copy of a CLIP MLP followed by a per-channel gate that starts at zero."""

    def __init__(self, clip_mlp: nn.Module, width: int) -> None:
        super().__init__()
        self.mlp = copy.deepcopy(clip_mlp).float()
        self.mlp.requires_grad_(True)
        self.gate = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.mlp(x)


class MGDE(nn.Module):
    """Sparse mixture of semantic and sample experts added residually to the pooled image feature.

    ``semantic_features`` (M, width) are the commonality and difference prompt features
    already mapped into width space (``t_w = visual.proj @ t``). One spherical K-means run
    picks ``n_semantic_experts * n_centres`` centres among them, and semantic expert ``e``
    takes centres ``e * n_centres`` to ``(e + 1) * n_centres - 1`` in K-means order. A single
    run gives every expert distinct centres, whereas separate runs over the same features
    could return near-identical centres for several experts.

    ``clip_mlp`` is an open_clip ViT block's ``mlp`` (``c_fc``, ``gelu``, ``c_proj``). Each
    sample expert gets its own trainable copy, and ``clip_mlp`` itself is never modified.
    Either input may be None when the ``experts`` setting leaves out its kind of expert.

    The module is float32 and lives on ``semantic_features``' device, or on ``clip_mlp``'s
    when there are no semantic experts. Move it with ``.to()`` as usual.

    NOTE: K-means keeps all M semantic features in memory. Prompts for every ordered class
    pair give M = 2 * C^2 rows (two million for ImageNet), so large label sets should pass
    the features of the mined confusion pairs or a subsample.
    """

    def __init__(
        self,
        config: MGDEConfig,
        width: int,
        context_dim: int,
        semantic_features: torch.Tensor | None = None,
        clip_mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if width < 1 or context_dim < 0:
            raise ValueError(f"MGDE: width={width} must be >= 1 and context_dim={context_dim} must be >= 0")
        self.config = config
        self.width = width
        self.context_dim = context_dim

        self.semantic_experts = nn.ModuleList(self._build_semantic_experts(semantic_features))
        self.sample_experts = nn.ModuleList(self._build_sample_experts(clip_mlp))
        self.top_k = self._effective_top_k()
        self.router = nn.Linear(width + context_dim, self.num_experts) if self.num_experts > 0 else None

        self.to(self._home_device(semantic_features, clip_mlp))
        logger.info(
            "MGDE: %d semantic expert(s) with %d centres each, %d sample expert(s), top-%d routing over %d input dims",
            len(self.semantic_experts),
            config.n_centres,
            len(self.sample_experts),
            self.top_k,
            width + context_dim,
        )

    @property
    def num_experts(self) -> int:
        return len(self.semantic_experts) + len(self.sample_experts)

    @property
    def expert_names(self) -> list[str]:
        """Names in router order, e.g. ``["semantic0", "semantic1", "sample0"]``."""
        semantic = [f"semantic{i}" for i in range(len(self.semantic_experts))]
        sample = [f"sample{i}" for i in range(len(self.sample_experts))]
        return semantic + sample

    def experts(self) -> list[nn.Module]:
        """Experts in router order: semantic first, then sample."""
        return list(self.semantic_experts) + list(self.sample_experts)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> MGDEOutput:
        """Add the routed expert residual to ``x`` (B, width), routing on ``[x ; context]`` (B, width + context_dim)."""
        self._check_inputs(x, context)
        if self.num_experts == 0:
            no_experts = x.new_zeros(x.shape[0], 0)
            return MGDEOutput(x, no_experts, no_experts, no_experts.bool())

        router_probs = self._router_probs(x, context)  # (B, n_experts)
        router_weights, expert_mask = route_top_k(router_probs, self.top_k)  # (B, n_experts) each

        residual = self._mix_experts(x, router_weights, expert_mask)  # (B, width)
        return MGDEOutput(x + residual.to(x.dtype), router_weights, router_probs, expert_mask)

    def _router_probs(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            router_input = x  # (B, width)
        else:
            router_input = torch.cat([x, context.to(x.dtype)], dim=1)  # (B, width + context_dim)
        logits = self.router(router_input).float()  # (B, n_experts)

        if self.training and self.config.router_noise > 0:
            logits = logits + self.config.router_noise * torch.randn_like(logits)
        return logits.softmax(dim=-1)

    def _mix_experts(self, x: torch.Tensor, router_weights: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
        """Sum ``r_e * expert_e(x)`` over each sample's routed experts, running each expert on its samples only."""
        residual = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)

        for index, expert in enumerate(self.experts()):
            rows = torch.nonzero(expert_mask[:, index]).flatten()  # (R,)
            if rows.numel() == 0:
                continue
            weighted = router_weights[rows, index].unsqueeze(1) * expert(x[rows])  # (R, width)
            residual = residual.index_add(0, rows, weighted.to(residual.dtype))
        return residual

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"MGDE expects x of shape (B, {self.width}), got {tuple(x.shape)}")
        if self.context_dim == 0:
            if context is not None and context.shape[-1] != 0:
                raise ValueError(
                    f"MGDE was built with context_dim=0 but got a context of shape {tuple(context.shape)}"
                )
            return
        if context is None:
            raise ValueError(
                f"MGDE was built with context_dim={self.context_dim}, so a (B, context_dim) context is required"
            )
        if context.shape != (x.shape[0], self.context_dim):
            raise ValueError(
                f"MGDE expects context of shape ({x.shape[0]}, {self.context_dim}), got {tuple(context.shape)}"
            )

    def _build_semantic_experts(self, semantic_features: torch.Tensor | None) -> list[SemanticExpert]:
        count = self.config.num_semantic
        if count == 0:
            return []
        if semantic_features is None:
            raise ValueError(
                f"MGDE: experts={self.config.experts!r} needs semantic_features (M, {self.width}), got None"
            )
        if semantic_features.ndim != 2 or semantic_features.shape[1] != self.width:
            raise ValueError(
                f"MGDE: semantic_features must have shape (M, width={self.width}), got "
                f"{tuple(semantic_features.shape)}. Map the prompt features into width space before building MGDE"
            )

        n_centres = self.config.n_centres
        total = count * n_centres
        if total > semantic_features.shape[0]:
            raise ValueError(
                f"MGDE: n_semantic_experts * n_centres = {count} * {n_centres} = {total} K-means centres need at "
                f"least that many semantic features, got M={semantic_features.shape[0]}. "
                "Lower n_centres or n_semantic_experts"
            )

        result = kmeans(semantic_features.float(), total, seed=self.config.kmeans_seed, cosine=True)
        logger.info(
            "MGDE: K-means over %d semantic features, %d centres, inertia %.4f",
            semantic_features.shape[0],
            total,
            result.inertia,
        )
        chunks = result.centres.split(n_centres)  # count tensors of (n_centres, width)
        return [SemanticExpert(chunk) for chunk in chunks]

    def _build_sample_experts(self, clip_mlp: nn.Module | None) -> list[SampleExpert]:
        count = self.config.num_sample
        if count == 0:
            return []
        if clip_mlp is None:
            raise ValueError(
                f"MGDE: experts={self.config.experts!r} needs clip_mlp (a ViT block's mlp), got None"
            )

        c_fc = getattr(clip_mlp, "c_fc", None)
        c_proj = getattr(clip_mlp, "c_proj", None)
        if not isinstance(c_fc, nn.Linear) or not isinstance(c_proj, nn.Linear):
            raise ValueError(
                "MGDE: clip_mlp must be an open_clip ViT block's mlp with Linear c_fc and c_proj, "
                f"got {type(clip_mlp).__name__}"
            )
        if c_fc.in_features != self.width or c_proj.out_features != self.width:
            raise ValueError(
                f"MGDE: clip_mlp maps {c_fc.in_features} -> {c_proj.out_features} features, but width={self.width}. "
                "Pass the mlp of the same ViT whose pooled feature MGDE acts on"
            )
        return [SampleExpert(clip_mlp, self.width) for _ in range(count)]

    def _effective_top_k(self) -> int:
        if self.num_experts == 0 or self.config.top_k <= self.num_experts:
            return self.config.top_k
        warnings.warn(
            f"MGDE: top_k={self.config.top_k} exceeds the {self.num_experts} expert(s) of "
            f"experts={self.config.experts!r}, so every sample is routed to all of them",
            stacklevel=3,
        )
        return self.num_experts

    @staticmethod
    def _home_device(semantic_features: torch.Tensor | None, clip_mlp: nn.Module | None) -> torch.device:
        if semantic_features is not None:
            return semantic_features.device
        if clip_mlp is not None:
            return next(clip_mlp.parameters()).device
        return torch.device("cpu")


def route_top_k(router_probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's ``top_k`` largest probabilities, renormalised to sum to one.

    Returns the sparse weights (B, n_experts) and the bool routing mask (B, n_experts) with
    exactly ``top_k`` True entries per row. Ties go to the lower expert index.
    """
    top_values, top_indices = router_probs.topk(top_k, dim=-1)  # (B, top_k) each
    top_values = top_values / top_values.sum(dim=-1, keepdim=True)

    router_weights = torch.zeros_like(router_probs).scatter(1, top_indices, top_values)  # (B, n_experts)
    expert_mask = torch.zeros_like(router_probs, dtype=torch.bool).scatter(1, top_indices, True)  # (B, n_experts)
    return router_weights, expert_mask


def load_balancing_loss(router_probs: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
    """Compute the Switch Transformer load-balancing loss ``n_experts * sum_e f_e * P_e``.

    The loss is the auxiliary loss of Fedus et al., "Switch Transformers", arXiv 2101.03961,
    extended to top-k routing.

    ``f_e`` is the share of routing slots (B * top_k in all) that went to expert ``e``, taken
    from ``expert_mask`` (B, n_experts), and ``P_e`` is the batch mean of ``router_probs``
    (B, n_experts). Normalising ``f`` by the slot count makes the loss 1 when both the routing
    and the probabilities are uniform, for any top_k. It grows to ``n_experts`` when every
    sample goes to one expert with probability one. The gradient flows through ``P`` only,
    because the routing mask is a discrete choice.
    """
    if router_probs.ndim != 2 or router_probs.shape != expert_mask.shape:
        raise ValueError(
            f"load_balancing_loss expects router_probs and expert_mask of the same (B, n_experts) shape, got "
            f"{tuple(router_probs.shape)} and {tuple(expert_mask.shape)}"
        )
    num_experts = router_probs.shape[1]
    if num_experts == 0:
        return router_probs.new_zeros(())

    mask = expert_mask.to(router_probs.dtype)
    slot_share = mask.sum(dim=0) / mask.sum().clamp_min(1)  # (n_experts,)
    mean_probs = router_probs.mean(dim=0)  # (n_experts,)
    return num_experts * (slot_share * mean_probs).sum()
