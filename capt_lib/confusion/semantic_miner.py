"""The Semantic Confusion Miner (SEM): which class pairs an image is confused within, and their text.

For an image with base-model probabilities C (over C classes) and pseudo label
p = argmax C, the confusion score of every other class i is

    S_i = (1 + n_{p,i} / sum_j n_{p,j}) * C_i        (i != p),

where n counts the confusion bank's mistakes between p and i. The k classes with the
highest scores give the image's confusion pairs (p, i_1), ..., (p, i_k). The miner
returns those pairs, the image's confusion intensity, and a semantic context vector:
the mean of the frozen text features of the pairs' commonality and difference prompts.

The bank's count matrix is ``counts[t, p]`` = number of images of true class t that
the base model predicted as p. Which of its entries is n_{p,i} is a setting (see
``confusion_scores``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from capt_lib.prompts.semantic import PairPrompts

logger = logging.getLogger(__name__)

SCORE_DIRECTIONS = ("row", "col", "both")


def count_shares(counts: torch.Tensor, direction: str = "both") -> torch.Tensor:
    """Return share[p, i] = n_{p,i} / sum_j n_{p,j}, with rows of zero total set to zero: (C, C).

    The diagonal of ``counts`` is ignored, because a correct prediction is no confusion.
    ``direction`` picks n from ``counts[t, p]`` (true class t predicted as p):
    "row" uses n_{p,i} = counts[p, i], "col" uses counts[i, p], "both" their sum.
    """
    if direction not in SCORE_DIRECTIONS:
        raise ValueError(f"direction={direction!r} is invalid; choose one of {list(SCORE_DIRECTIONS)}")
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square (C, C) matrix, got shape {tuple(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative: counts[t, p] is a number of images")

    counts = counts.float()
    off_diagonal = counts * (1 - torch.eye(len(counts), device=counts.device))  # (C, C)
    if direction == "row":
        n = off_diagonal
    elif direction == "col":
        n = off_diagonal.T
    else:
        n = off_diagonal + off_diagonal.T

    totals = n.sum(dim=1, keepdim=True)  # (C, 1)
    safe_totals = torch.where(totals > 0, totals, torch.ones_like(totals))  # avoids 0 / 0 in empty rows
    return n / safe_totals  # (C, C); an empty row is all zeros


def confusion_scores(
    probs: torch.Tensor,
    pseudo_labels: torch.Tensor,
    counts: torch.Tensor,
    direction: str = "both",
) -> torch.Tensor:
    """Score every class as a confusion partner of the image's pseudo label: (B, C).

    S_i = (1 + n_{p,i} / sum_j n_{p,j}) * C_i for i != p, and S_p = -inf so the pseudo
    label is never its own partner. A pseudo label whose bank row has no confusions
    (every novel class, as the bank records base classes only) gets S_i = C_i.

    ``direction`` selects which bank mistakes count as n_{p,i}, from ``counts[t, p]`` =
    images of true class t predicted as p:

    - "row": counts[p, i], how often true class p was mistaken for i;
    - "col": counts[i, p], how often the pseudo label p was wrong and the truth was i;
    - "both" (the default): counts[p, i] + counts[i, p].

    The default is "both" for three reasons. At test time only p is known: when p is
    wrong the true class shows in the column, and when p is right the classes it is
    mistaken for show in the row, so both directions are pairs the model mixes up.
    Then, a 16-shot bank holds few mistakes per class, and summing both directions
    doubles the evidence behind each share. Finally, the commonality prompt that the
    pair selects is symmetric in (p, i).
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be (B, C), got shape {tuple(probs.shape)}")
    if pseudo_labels.shape != probs.shape[:1]:
        raise ValueError(
            f"pseudo_labels must be (B,) = ({probs.shape[0]},), got shape {tuple(pseudo_labels.shape)}"
        )
    num_classes = probs.shape[1]
    if tuple(counts.shape) != (num_classes, num_classes):
        raise ValueError(
            f"counts has shape {tuple(counts.shape)} but probs has {num_classes} classes; pass the bank's "
            "counts over the same classes, with zero rows and columns for classes the bank has never seen"
        )

    share = count_shares(counts.to(probs.device), direction).to(probs.dtype)  # (C, C)
    scores = (1 + share[pseudo_labels]) * probs  # (B, C)
    is_pseudo = torch.nn.functional.one_hot(pseudo_labels, num_classes).bool()  # (B, C)
    return scores.masked_fill(is_pseudo, float("-inf"))


def top_confusion_classes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k classes with the highest scores, highest first: (B, k).

    Ties go to the lower class index (a stable sort), so results are deterministic.
    """
    num_classes = scores.shape[1]
    if not 1 <= k <= num_classes - 1:
        raise ValueError(f"k={k} is invalid for {num_classes} classes; it must lie in [1, {num_classes - 1}]")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, C)
    return order[:, :k]


def confusion_intensity(probs: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Return c = 1 - (C_p - max_{i != p} C_i) per image, in [0, 1]: (B,).

    c = 1 when the top two classes tie and c = 0 when the model puts all mass on p.
    When p is not the argmax (pseudo labels from another model), the margin is
    negative and c is clamped to 1.
    """
    num_classes = probs.shape[1]
    is_pseudo = torch.nn.functional.one_hot(pseudo_labels, num_classes).bool()  # (B, C)
    pseudo_prob = probs.gather(1, pseudo_labels[:, None]).squeeze(1)  # (B,)
    runner_up = probs.masked_fill(is_pseudo, float("-inf")).max(dim=1).values  # (B,)
    return (1 - (pseudo_prob - runner_up)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class SEMConfig:
    """Settings of the Semantic Confusion Miner."""

    k: int = 2  # confusion pairs per image: the top-k classes by confusion score
    direction: str = "both"  # which bank counts make n_{p,i}: "row", "col" or "both" (see confusion_scores)
    use_commonality: bool = True  # add the pairs' commonality prompt features to the context
    use_difference: bool = True  # add the pairs' difference prompt features to the context

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"SEMConfig.k={self.k} is invalid; it must be at least 1")
        if self.direction not in SCORE_DIRECTIONS:
            raise ValueError(
                f"SEMConfig.direction={self.direction!r} is invalid; choose one of {list(SCORE_DIRECTIONS)}"
            )


@dataclass
class SEMOutput:
    """Miner results for a batch of B images, with k pairs each and E-dimensional text features."""

    pseudo_labels: torch.Tensor  # (B,) int64, argmax of the probabilities
    pair_classes: torch.Tensor  # (B, k) int64, partner i of each confusion pair (p, i), highest score first
    scores: torch.Tensor  # (B, C) confusion scores, -inf at the pseudo label
    intensity: torch.Tensor  # (B,) confusion intensity in [0, 1]
    context: torch.Tensor  # (B, E) mean prompt feature of the pairs, zeros when no prompt kind is used


class SemanticConfusionMiner(nn.Module):
    """Find each image's confusion pairs from its probabilities and the bank's counts.

    The miner has no trainable parameters. Its buffers are the bank's counts (C, C)
    and the frozen, L2-normalised prompt features ``commonality`` (C, C, E) and
    ``difference`` (C, C, E). ``commonality[a, b]`` describes what a and b share, so it
    is symmetric in a and b, and ``difference[a, b]`` describes how a differs from b.

    The context of an image with pseudo label p and partners i_1..i_k is the mean of
    ``commonality[p, i_j]`` and ``difference[p, i_j]`` over the k pairs, each kind only
    when the config enables it. ``difference[p, i]`` is the direction used because p
    is the class the image is taken for, so the text states what separates p from the
    class it may truly be. The mean is not renormalised, so its norm shrinks as the k
    pairs disagree, and it is all zeros when both kinds are off (the "no SEM" ablation).
    """

    def __init__(
        self,
        counts: torch.Tensor | np.ndarray | None,
        commonality: torch.Tensor,
        difference: torch.Tensor,
        config: SEMConfig = SEMConfig(),
    ):
        """``counts=None`` means a bank without mistakes, e.g. when all classes are novel."""
        super().__init__()
        num_classes = commonality.shape[0]
        if commonality.ndim != 3 or commonality.shape[1] != num_classes:
            raise ValueError(f"commonality must be (C, C, E), got shape {tuple(commonality.shape)}")
        if difference.shape != commonality.shape:
            raise ValueError(
                f"difference has shape {tuple(difference.shape)}, commonality {tuple(commonality.shape)}; "
                "both must be (C, C, E) over the same classes"
            )
        if config.k > num_classes - 1:
            raise ValueError(
                f"SEMConfig.k={config.k} is too large for {num_classes} classes; the maximum is {num_classes - 1}"
            )

        if counts is None:
            counts = torch.zeros(num_classes, num_classes)
        counts = torch.as_tensor(counts).float()
        count_shares(counts, config.direction)  # validates shape and sign

        self.config = config
        # NOTE: the prompt buffers are dense over all C*C pairs, fine for tens of classes; at
        # ImageNet's 1000 classes and E=512 each would take 2 GB, so large label sets need sparse pairs.
        self.register_buffer("counts", counts)  # (C, C) float copy of the bank's counts[t, p]
        self.register_buffer("commonality", commonality.detach().float())  # (C, C, E)
        self.register_buffer("difference", difference.detach().float())  # (C, C, E)

    @classmethod
    def from_prompts(
        cls,
        counts: torch.Tensor | np.ndarray | None,
        pair_prompts: PairPrompts,
        classnames: Sequence[str],
        encode_text_fn: Callable[[list[str]], torch.Tensor],
        config: SEMConfig = SEMConfig(),
    ) -> "SemanticConfusionMiner":
        """Encode the pair sentences of ``classnames`` with ``encode_text_fn`` and build the miner."""
        commonality, difference = encode_pair_prompts(encode_text_fn, pair_prompts, classnames)
        return cls(counts, commonality, difference, config)

    @property
    def num_classes(self) -> int:
        return self.commonality.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.commonality.shape[-1]

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> SEMOutput:
        """Mine the confusion pairs of a batch from its base-model probabilities (B, C).

        No gradient flows through the miner, because the base model and the prompt
        features are frozen.
        """
        pseudo_labels = probs.argmax(dim=1)  # (B,)
        scores = confusion_scores(probs, pseudo_labels, self.counts, self.config.direction)  # (B, C)
        pair_classes = top_confusion_classes(scores, self.config.k)  # (B, k)
        intensity = confusion_intensity(probs, pseudo_labels)  # (B,)

        pseudo = pseudo_labels[:, None].expand_as(pair_classes)  # (B, k)
        kinds = []
        if self.config.use_commonality:
            kinds.append(self.commonality[pseudo, pair_classes])  # (B, k, E)
        if self.config.use_difference:
            kinds.append(self.difference[pseudo, pair_classes])  # (B, k, E)
        if kinds:
            context = torch.stack(kinds).mean(dim=(0, 2))  # (n_kinds, B, k, E) -> (B, E)
        else:
            context = self.commonality.new_zeros(len(probs), self.embed_dim)  # (B, E)

        return SEMOutput(pseudo_labels, pair_classes, scores, intensity, context.to(probs.dtype))


@torch.no_grad()
def encode_pair_prompts(
    encode_text_fn: Callable[[list[str]], torch.Tensor],
    pair_prompts: PairPrompts,
    classnames: Sequence[str],
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the commonality and difference sentences of every pair: two (C, C, E) tensors.

    Each pair's feature is the mean of its L2-normalised sentence features,
    renormalised. ``commonality`` is symmetric and ``difference[a, b]`` encodes how a
    differs from b; the diagonal is zero because a class is never its own partner.
    Index order follows ``classnames``, which must be classes of ``pair_prompts``.
    Every distinct sentence is encoded once, in chunks of ``chunk_size``.
    """
    classnames = tuple(classnames)
    num_classes = len(classnames)
    if num_classes < 2:
        raise ValueError(f"pair prompts need at least 2 classes, got {list(classnames)}")

    # Collect (kind, a, b) -> sentence ids; kind 0 is commonality, 1 is difference.
    sentence_ids: dict[str, int] = {}
    owners: list[tuple[int, int, int, int]] = []  # (kind, a, b, sentence id) per sentence use
    for a, b in itertools.permutations(range(num_classes), 2):
        pairs = (
            pair_prompts.commonality_of(classnames[a], classnames[b]),
            pair_prompts.difference_of(classnames[a], classnames[b]),
        )
        for kind, sentences in enumerate(pairs):
            for sentence in sentences:
                owners.append((kind, a, b, sentence_ids.setdefault(sentence, len(sentence_ids))))

    texts = list(sentence_ids)
    chunks = range(0, len(texts), chunk_size)
    features = [
        nn.functional.normalize(encode_text_fn(texts[start : start + chunk_size]).float(), dim=-1)
        for start in tqdm(chunks, desc="encoding pair prompts", leave=False)
    ]
    features = torch.cat(features)  # (n_sentences, E)
    logger.info("encoded %d distinct pair sentences for %d classes", len(texts), num_classes)

    kind, a, b, sentence = (torch.tensor(column, device=features.device) for column in zip(*owners))
    slot = (kind * num_classes + a) * num_classes + b  # flat index into (2, C, C)
    sums = features.new_zeros(2 * num_classes * num_classes, features.shape[1])  # (2*C*C, E)
    sums.index_add_(0, slot, features[sentence])
    pair_features = nn.functional.normalize(sums, dim=-1).view(2, num_classes, num_classes, -1)  # (2, C, C, E)
    return pair_features[0], pair_features[1]
