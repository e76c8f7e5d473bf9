"""Sample Confusion Miner (SAM): retrieval of confused training images from the confusion bank.

For a training image and one of its confusion pairs (a, b), the candidate set U contains the
bank rows whose (true label, pseudo label) is (a, b) or (b, a): both directions are
pooled, because an image of a taken for b and an image of b taken for a both show what
separates the two classes. Rows that the base model classified correctly are never in U.
The image's own bank row is excluded, so a training image never retrieves itself.

Retrieval is training-only. At test time the CAPT model uses the image's own tokens and
never reads the bank's images, so ``retrieve`` raises in eval mode unless
``allow_eval_retrieval`` is set (see ``SampleConfusionMiner``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

SAM_MODES = ("representative", "random", "none")


@dataclass(frozen=True)
class SAMConfig:
    """Settings of the Sample Confusion Miner."""

    mode: str = "representative"  # "representative" takes the argmax cosine over U, "random" a uniform member, "none" nothing
    seed: int = 0  # seed of the miner's own generator, used by mode="random" when no generator is passed
    chunk_size: int = 16384  # candidate rows whose features are gathered at once, bounding memory to chunk_size * E floats

    def __post_init__(self):
        if self.mode not in SAM_MODES:
            raise ValueError(f"SAMConfig.mode={self.mode!r} is not supported; choose one of {SAM_MODES}")
        if self.chunk_size < 1:
            raise ValueError(f"SAMConfig.chunk_size={self.chunk_size} must be at least 1")


class SampleConfusionMiner(nn.Module):
    """Retrieval of one confused training image from the bank per (image, confusion pair).

    The bank tensors are registered as non-persistent buffers: they move with the module
    (``.to(device)``) but stay out of its ``state_dict``, because the bank is cached on
    disk separately and rebuilt into the miner when a run starts.

    Retrieval works on pair keys: every confused bank row gets the unordered key
    ``min(t, p) * num_classes + max(t, p)``, and the rows are kept sorted by that key, so
    the members of U for a batch of pairs are contiguous ranges found by
    ``torch.searchsorted``. The cost is O(sum |U| * E) rather than the O(B * N * E) of a
    dense (B, k, N) membership mask, and no Python loop runs over the batch or the pairs.

    ``retrieve`` raises RuntimeError while the module is in eval mode, so that an
    evaluation loop cannot read bank images by mistake. Set ``allow_eval_retrieval = True``
    to lift the check, for example in an analysis notebook that inspects retrievals.
    """

    def __init__(
        self,
        features: torch.Tensor,
        true_labels: torch.Tensor,
        pseudo_labels: torch.Tensor,
        sample_ids: torch.Tensor,
        num_classes: int,
        cfg: SAMConfig = SAMConfig(),
    ):
        super().__init__()
        _check_bank(features, true_labels, pseudo_labels, sample_ids, num_classes)
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.allow_eval_retrieval = False
        self.generator = torch.Generator().manual_seed(cfg.seed)

        features = nn.functional.normalize(features.float(), dim=-1).to(features.dtype)
        self.register_buffer("features", features, persistent=False)  # (N, E), L2-normalised
        self.register_buffer("true_labels", true_labels.long(), persistent=False)  # (N,)
        self.register_buffer("pseudo_labels", pseudo_labels.long(), persistent=False)  # (N,)
        self.register_buffer("sample_ids", sample_ids.long(), persistent=False)  # (N,)

        keys = self._pair_keys(self.true_labels, self.pseudo_labels)  # (N,)
        confused_rows = torch.nonzero(self.true_labels != self.pseudo_labels).flatten()  # (N_confused,)
        sorted_keys, order = torch.sort(keys[confused_rows], stable=True)  # stable: rows ascend within a key
        self.register_buffer("sorted_pair_keys", sorted_keys, persistent=False)  # (N_confused,)
        self.register_buffer("sorted_pair_rows", confused_rows[order], persistent=False)  # (N_confused,)

        logger.info(
            "SampleConfusionMiner: %d bank rows, %d confused, %d classes, mode=%s",
            len(sample_ids), len(confused_rows), num_classes, cfg.mode,
        )

    @property
    def num_rows(self) -> int:
        return int(self.features.shape[0])

    def _pair_keys(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Unordered pair key of classes ``a`` and ``b`` (same shapes): (a, b) and (b, a) share it."""
        return torch.minimum(a, b) * self.num_classes + torch.maximum(a, b)

    def retrieve(
        self,
        query_features: torch.Tensor,
        pseudo_labels: torch.Tensor,
        partner_classes: torch.Tensor,
        query_sample_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pick one bank row per (image, confusion pair): (B, k) row indices, -1 where U is empty.

        Args:
            query_features: (B, E) image features. They need not be normalised, because the
                argmax of the cosine over U does not depend on the query's norm.
            pseudo_labels: (B,) pseudo label p of each image, the first class of its pairs.
            partner_classes: (B, k) partner classes i_1..i_k. An entry of -1 marks an unused
                slot and yields -1.
            query_sample_ids: (B,) sample ids of the images, used to exclude their own bank
                rows. Pass None only for images that are not in the bank.
            generator: random generator for mode="random". It defaults to the miner's own
                CPU generator seeded with ``cfg.seed``. One uniform number is drawn per
                (image, pair) slot, whether or not U is empty.

        In mode "representative" the winner is ``argmax_j cos(query, bank_j)`` over U, and
        ties go to the lowest row index. In mode "random" it is a uniformly random member.
        """
        if not self.training and not self.allow_eval_retrieval:
            raise RuntimeError(
                "SampleConfusionMiner.retrieve was called in eval mode; retrieval reads training "
                "images and must not run at test time. Call .train(), or set "
                "allow_eval_retrieval = True for an analysis that needs it."
            )
        self._check_query(query_features, pseudo_labels, partner_classes, query_sample_ids)
        batch_size, k = partner_classes.shape
        device = self.features.device

        if self.cfg.mode == "none" or batch_size == 0 or k == 0:
            return torch.full((batch_size, k), -1, dtype=torch.long, device=device)

        # Random draws come first, so that their count never depends on the bank's content.
        draws = None
        if self.cfg.mode == "random":
            draws = self._draw_uniform(batch_size * k, generator).to(device)  # (B*k,)

        segments, rows, queries = self._candidates(pseudo_labels, partner_classes)  # (M,), (M,), (M,)
        valid = torch.ones_like(rows, dtype=torch.bool)  # (M,)
        if query_sample_ids is not None:
            own_ids = query_sample_ids.to(device).long()[queries]  # (M,)
            valid = self.sample_ids[rows] != own_ids

        num_slots = batch_size * k
        if self.cfg.mode == "representative":
            winners = self._pick_most_similar(query_features.to(device), segments, rows, queries, valid, num_slots)
        else:
            winners = self._pick_random(draws, segments, rows, valid, num_slots)
        return winners.view(batch_size, k)

    def _draw_uniform(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        generator = self.generator if generator is None else generator
        return torch.rand(count, generator=generator, device=generator.device)

    def _candidates(
        self, pseudo_labels: torch.Tensor, partner_classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """List every (slot, bank row) pair where the row is in the slot's U, grouped by slot.

        Returns ``segments`` (the flat slot index b * k + j), ``rows`` (the bank row, ascending
        within a slot) and ``queries`` (the image index b), each of shape (M,) with
        M = sum over slots of |U|, before the self-exclusion.
        """
        device = self.features.device
        k = partner_classes.shape[1]
        pseudo = pseudo_labels.to(device).long()[:, None].expand_as(partner_classes)  # (B, k)
        partners = partner_classes.to(device).long()  # (B, k)

        keys = self._pair_keys(pseudo, partners).flatten()  # (B*k,)
        keys = torch.where(partners.flatten() < 0, -1, keys)  # unused slots match no key
        starts = torch.searchsorted(self.sorted_pair_keys, keys)  # (B*k,)
        ends = torch.searchsorted(self.sorted_pair_keys, keys, right=True)  # (B*k,)
        counts = ends - starts  # (B*k,) |U| per slot

        segments = torch.repeat_interleave(torch.arange(len(keys), device=device), counts)  # (M,)
        first_of_segment = torch.cumsum(counts, 0) - counts  # (B*k,) offset of each slot in the flat list
        offset_in_segment = torch.arange(len(segments), device=device) - first_of_segment[segments]  # (M,)
        rows = self.sorted_pair_rows[starts[segments] + offset_in_segment]  # (M,)
        return segments, rows, torch.div(segments, k, rounding_mode="floor")

    def _pick_most_similar(
        self,
        query_features: torch.Tensor,
        segments: torch.Tensor,
        rows: torch.Tensor,
        queries: torch.Tensor,
        valid: torch.Tensor,
        num_slots: int,
    ) -> torch.Tensor:
        """Per slot, the valid row with the highest similarity, the lowest row winning ties."""
        similarities = self._similarities(query_features, rows, queries)  # (M,)
        similarities = similarities.masked_fill(~valid, float("-inf"))

        best = torch.full((num_slots,), float("-inf"), device=rows.device)
        best = best.scatter_reduce(0, segments, similarities, reduce="amax")  # (B*k,)

        no_row = self.num_rows
        is_best = valid & (similarities == best[segments])  # (M,)
        candidates = torch.where(is_best, rows, no_row)  # (M,)
        winners = torch.full((num_slots,), no_row, dtype=torch.long, device=rows.device)
        winners = winners.scatter_reduce(0, segments, candidates, reduce="amin")  # (B*k,)
        return torch.where(winners == no_row, -1, winners)

    def _similarities(self, query_features: torch.Tensor, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Dot products of bank rows with their queries in float32, gathered ``chunk_size`` rows at a time: (M,)."""
        similarities = torch.empty(len(rows), dtype=torch.float32, device=rows.device)
        query_features = query_features.float()
        for start in range(0, len(rows), self.cfg.chunk_size):
            stop = start + self.cfg.chunk_size
            # index_select: on CPU it gathers rows about 10x faster than advanced indexing
            bank = self.features.index_select(0, rows[start:stop]).float()  # (chunk, E)
            query = query_features.index_select(0, queries[start:stop])  # (chunk, E)
            similarities[start:stop] = (bank * query).sum(-1)
        return similarities

    def _pick_random(
        self, draws: torch.Tensor, segments: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, num_slots: int
    ) -> torch.Tensor:
        """Per slot, the valid row of rank floor(u * |U|) in ascending row order, u being the slot's draw."""
        sizes = torch.zeros(num_slots, dtype=torch.long, device=rows.device)
        sizes = sizes.scatter_add(0, segments, valid.long())  # (B*k,) |U| after the self-exclusion
        chosen_rank = torch.floor(draws * sizes).long()  # (B*k,)
        chosen_rank = torch.minimum(chosen_rank, sizes - 1)  # float rounding can give u * |U| == |U|

        valid_before_slot = torch.cumsum(sizes, 0) - sizes  # (B*k,)
        rank = torch.cumsum(valid.long(), 0) - 1 - valid_before_slot[segments]  # (M,) rank among valid rows of the slot
        picked = valid & (rank == chosen_rank[segments])  # (M,) exactly one per non-empty slot

        winners = torch.full((num_slots,), -1, dtype=torch.long, device=rows.device)
        winners[segments[picked]] = rows[picked]
        return winners

    def _check_query(
        self,
        query_features: torch.Tensor,
        pseudo_labels: torch.Tensor,
        partner_classes: torch.Tensor,
        query_sample_ids: torch.Tensor | None,
    ) -> None:
        embed_dim = self.features.shape[1]
        if query_features.ndim != 2 or query_features.shape[1] != embed_dim:
            raise ValueError(
                f"SampleConfusionMiner.retrieve: query_features has shape {tuple(query_features.shape)}; "
                f"expected (B, {embed_dim}) to match the bank features"
            )
        batch_size = query_features.shape[0]
        if pseudo_labels.shape != (batch_size,):
            raise ValueError(
                f"SampleConfusionMiner.retrieve: pseudo_labels has shape {tuple(pseudo_labels.shape)}; expected ({batch_size},)"
            )
        if partner_classes.ndim != 2 or partner_classes.shape[0] != batch_size:
            raise ValueError(
                f"SampleConfusionMiner.retrieve: partner_classes has shape {tuple(partner_classes.shape)}; "
                f"expected ({batch_size}, k)"
            )
        if query_sample_ids is not None and query_sample_ids.shape != (batch_size,):
            raise ValueError(
                f"SampleConfusionMiner.retrieve: query_sample_ids has shape {tuple(query_sample_ids.shape)}; "
                f"expected ({batch_size},) or None"
            )
        if pseudo_labels.is_floating_point() or partner_classes.is_floating_point():
            raise ValueError("SampleConfusionMiner.retrieve: pseudo_labels and partner_classes must be integer tensors")

        # NOTE: these range checks synchronise with the GPU once per call.
        if pseudo_labels.numel() and (pseudo_labels.min() < 0 or pseudo_labels.max() >= self.num_classes):
            raise ValueError(
                f"SampleConfusionMiner.retrieve: pseudo_labels must lie in [0, {self.num_classes}); "
                f"got values in [{int(pseudo_labels.min())}, {int(pseudo_labels.max())}]"
            )
        if partner_classes.numel() and (partner_classes.min() < -1 or partner_classes.max() >= self.num_classes):
            raise ValueError(
                f"SampleConfusionMiner.retrieve: partner_classes must lie in [0, {self.num_classes}), or be -1 "
                f"for an unused slot; got values in [{int(partner_classes.min())}, {int(partner_classes.max())}]"
            )
        if (partner_classes == pseudo_labels[:, None].to(partner_classes.device)).any():
            raise ValueError(
                "SampleConfusionMiner.retrieve: a partner class equals the image's own pseudo label; "
                "a confusion pair needs two different classes"
            )


def _check_bank(
    features: torch.Tensor,
    true_labels: torch.Tensor,
    pseudo_labels: torch.Tensor,
    sample_ids: torch.Tensor,
    num_classes: int,
) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"SampleConfusionMiner: bank features must have shape (N, E) with N > 0; got {tuple(features.shape)}")
    num_rows = features.shape[0]
    named = {"true_labels": true_labels, "pseudo_labels": pseudo_labels, "sample_ids": sample_ids}
    for name, tensor in named.items():
        if tensor.shape != (num_rows,):
            raise ValueError(
                f"SampleConfusionMiner: bank {name} has shape {tuple(tensor.shape)}; expected ({num_rows},) "
                "to match the bank features"
            )
        if tensor.is_floating_point():
            raise ValueError(f"SampleConfusionMiner: bank {name} must be an integer tensor; got {tensor.dtype}")

    if num_classes < 2:
        raise ValueError(f"SampleConfusionMiner: num_classes={num_classes}; a confusion pair needs at least 2 classes")
    for name in ("true_labels", "pseudo_labels"):
        labels = named[name]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"SampleConfusionMiner: bank {name} must lie in [0, {num_classes}); "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
    if len(torch.unique(sample_ids)) != num_rows:
        raise ValueError(
            "SampleConfusionMiner: bank sample_ids contain duplicates; each bank row must be one "
            "distinct training image, or the self-exclusion cannot tell images apart"
        )


def retrieve_loop(
    miner: SampleConfusionMiner,
    query_features: torch.Tensor,
    pseudo_labels: torch.Tensor,
    partner_classes: torch.Tensor,
    query_sample_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference implementation of ``SampleConfusionMiner.retrieve``: a Python loop over images and pairs.

    It builds U with a full scan of the bank for every pair. It exists to check the batched
    path and to time it (benchmarks/retrieval.py), and it returns identical results: the
    same rows, the same tie rule and, in mode "random", the same draws from ``generator``.
    It skips the eval-mode guard and the input checks.
    """
    batch_size, k = partner_classes.shape
    mode = miner.cfg.mode
    winners = torch.full((batch_size, k), -1, dtype=torch.long)
    if mode == "none" or batch_size == 0 or k == 0:
        return winners.to(miner.features.device)

    draws = None
    if mode == "random":
        draws = miner._draw_uniform(batch_size * k, generator).cpu().view(batch_size, k)

    true_labels, pseudo_bank = miner.true_labels, miner.pseudo_labels
    for b in range(batch_size):
        a = int(pseudo_labels[b])
        for j in range(k):
            partner = int(partner_classes[b, j])
            if partner < 0:
                continue
            in_pair = ((true_labels == a) & (pseudo_bank == partner)) | ((true_labels == partner) & (pseudo_bank == a))
            if query_sample_ids is not None:
                in_pair &= miner.sample_ids != int(query_sample_ids[b])
            members = torch.nonzero(in_pair).flatten()  # ascending row indices
            if len(members) == 0:
                continue

            if mode == "representative":
                query = query_features[b].to(miner.features.device).float()
                similarities = (miner.features[members].float() * query).sum(-1)
                winners[b, j] = members[similarities == similarities.max()][0]
            else:
                rank = int(torch.floor(draws[b, j] * len(members)).clamp(max=len(members) - 1))
                winners[b, j] = members[rank]
    return winners.to(miner.features.device)
