"""Linear probe: multinomial logistic regression on frozen, L2-normalised image features.

The probe is the usual reference point for few-shot prompt tuning, and CoOp reports
its results against it. When a linear classifier on the frozen features beats
zero-shot accuracy, the features hold information that the hand-written prompts fail
to use.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _check_inputs(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, dim), got {tuple(features.shape)}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(f"labels must have shape ({len(features)},) to match the features, got {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), found [{int(labels.min())}, {int(labels.max())}]"
        )


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    steps: int = 200,
    seed: int = 0,
) -> torch.nn.Linear:
    """Fit a multinomial logistic regression on L2-normalised features, full batch, with L-BFGS.

    The loss is the mean cross-entropy plus ``weight_decay * ||W||^2`` (the bias is not
    penalised), minimised by at most ``steps`` L-BFGS iterations with strong-Wolfe line
    search. The weights start from N(0, 0.01^2) drawn from ``seed``. With
    ``weight_decay > 0`` the loss is strictly convex, so the solution does not depend
    on the start. The returned layer expects normalised features: apply it to
    ``F.normalize(features, dim=-1)``, as ``predict_linear_probe`` does.
    """
    _check_inputs(train_features, train_labels, num_classes)
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be non-negative")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")

    x = F.normalize(train_features.detach().float(), dim=-1)  # (N, dim)
    y = train_labels.detach().long().to(x.device)  # (N,)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        probe.weight.copy_(0.01 * torch.randn(probe.weight.shape, generator=generator))
        probe.bias.zero_()

    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=1.0, max_iter=steps, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    final_loss = optimizer.step(closure).detach()
    logger.debug("linear probe: final regularised loss %.6f", final_loss.item())
    return probe.requires_grad_(False)


@torch.no_grad()
def predict_linear_probe(probe: torch.nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """Return the probe's predicted labels (N,) for raw features (N, dim)."""
    return probe(F.normalize(features.float(), dim=-1)).argmax(dim=-1)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **fit_kwargs,
) -> float:
    """Fit a probe on the training features and return its test accuracy in [0, 1].

    ``fit_kwargs`` go to ``fit_linear_probe`` (``weight_decay``, ``steps``, ``seed``).
    """
    _check_inputs(test_features, test_labels, num_classes)
    probe = fit_linear_probe(train_features, train_labels, num_classes, **fit_kwargs)
    predictions = predict_linear_probe(probe, test_features.to(probe.weight.device))
    return float((predictions.cpu() == test_labels.cpu()).float().mean())
