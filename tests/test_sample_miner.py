"""Tests of the Sample Confusion Miner: hand-worked retrievals and parity with the reference loop."""

import pytest
import torch

from capt_lib.confusion.sample_miner import SAMConfig, SampleConfusionMiner, retrieve_loop


def one_hot(indices, dim=4):
    return torch.nn.functional.one_hot(torch.tensor(indices), dim).float()


def hand_bank(mode="representative"):
    """A 4-class bank whose retrievals are worked out by hand in the tests below.

    row  true  pseudo  feature   sample id
    0    0     1       e0        100
    1    1     0       e1        101
    2    0     1       e2        102
    3    0     0       e0        103   (correct, never in U)
    4    2     3       e3        104
    5    2     3       e3        105   (same feature as row 4: a tie)
    6    1     2       e1        106
    """
    features = one_hot([0, 1, 2, 0, 3, 3, 1])
    true_labels = torch.tensor([0, 1, 0, 0, 2, 2, 1])
    pseudo_labels = torch.tensor([1, 0, 1, 0, 3, 3, 2])
    sample_ids = torch.arange(100, 107)
    return SampleConfusionMiner(features, true_labels, pseudo_labels, sample_ids, 4, SAMConfig(mode=mode))


def random_bank(seed, num_rows=300, num_classes=12, embed_dim=16, mode="representative", chunk_size=16384):
    """A bank where each class is confused with two fixed partners, so most pairs have members.

    Half of the rows copy one of six prototype features, so many pairs hold exact ties.
    """
    generator = torch.Generator().manual_seed(seed)
    true_labels = torch.randint(0, num_classes, (num_rows,), generator=generator)
    partners = torch.stack([torch.randperm(num_classes, generator=generator)[:2] for _ in range(num_classes)])
    pick = torch.randint(0, 2, (num_rows,), generator=generator)
    pseudo_labels = partners[true_labels, pick]
    correct = torch.rand(num_rows, generator=generator) < 0.4
    pseudo_labels = torch.where(correct, true_labels, pseudo_labels)

    features = torch.randn(num_rows, embed_dim, generator=generator)
    prototypes = torch.randn(6, embed_dim, generator=generator)
    use_prototype = torch.rand(num_rows, generator=generator) < 0.5
    features[use_prototype] = prototypes[torch.randint(0, 6, (int(use_prototype.sum()),), generator=generator)]
    sample_ids = torch.randperm(10 * num_rows, generator=generator)[:num_rows]
    cfg = SAMConfig(mode=mode, seed=seed, chunk_size=chunk_size)
    return SampleConfusionMiner(features, true_labels, pseudo_labels, sample_ids, num_classes, cfg)


def random_queries(miner, seed, batch_size=40, k=3):
    """Queries drawn from the bank itself (so self-exclusion matters), with some unused slots."""
    generator = torch.Generator().manual_seed(seed + 1)
    rows = torch.randint(0, miner.num_rows, (batch_size,), generator=generator)
    query_features = miner.features[rows] + 0.1 * torch.randn(batch_size, miner.features.shape[1], generator=generator)
    pseudo = miner.pseudo_labels[rows]
    shift = torch.randint(1, miner.num_classes, (batch_size, k), generator=generator)
    partners = (pseudo[:, None] + shift) % miner.num_classes  # never equal to the pseudo label
    partners[torch.rand(batch_size, k, generator=generator) < 0.1] = -1
    return query_features, pseudo, partners, miner.sample_ids[rows]


def test_representative_hand_bank():
    miner = hand_bank()
    query = one_hot([2]) + 0.5 * one_hot([1])  # closest to e2, then e1
    pseudo = torch.tensor([0])
    partners = torch.tensor([[1, 3, 2]])

    result = miner.retrieve(query, pseudo, partners)

    # pair (0, 1): U = rows 0, 1, 2 (both directions), cosines 0, 0.5, 1 -> row 2
    # pair (0, 3): no row has (true, pseudo) in {(0, 3), (3, 0)} -> -1
    # pair (0, 2): no confused row either; row 6 is (1, 2) -> -1
    assert result.tolist() == [[2, -1, -1]]


def test_self_exclusion():
    miner = hand_bank()
    query = one_hot([2])
    pseudo = torch.tensor([1])
    partners = torch.tensor([[0]])

    without_ids = miner.retrieve(query, pseudo, partners)
    as_row_2 = miner.retrieve(query, pseudo, partners, query_sample_ids=torch.tensor([102]))

    assert without_ids.tolist() == [[2]]
    # with row 2 excluded, rows 0 and 1 both have cosine 0 -> tie, the lowest row wins
    assert as_row_2.tolist() == [[0]]


def test_self_exclusion_of_only_member():
    miner = hand_bank()
    query = one_hot([1])
    pseudo = torch.tensor([1])
    partners = torch.tensor([[2]])

    result = miner.retrieve(query, pseudo, partners, query_sample_ids=torch.tensor([106]))

    assert result.tolist() == [[-1]]


def test_tie_goes_to_lowest_row():
    miner = hand_bank()
    query = one_hot([3])
    pseudo = torch.tensor([3])
    partners = torch.tensor([[2]])

    result = miner.retrieve(query, pseudo, partners)

    # rows 4 and 5 both have feature e3 and cosine 1
    assert result.tolist() == [[4]]


def test_unused_slot_returns_minus_one():
    miner = hand_bank()
    result = miner.retrieve(one_hot([0]), torch.tensor([0]), torch.tensor([[-1, 1]]))

    assert result.tolist() == [[-1, 0]]


def test_none_mode_returns_minus_one():
    miner = hand_bank(mode="none")
    result = miner.retrieve(one_hot([0, 1]), torch.tensor([0, 1]), torch.tensor([[1], [0]]))

    assert result.tolist() == [[-1], [-1]]


def test_query_norm_does_not_matter():
    miner = random_bank(seed=3)
    query_features, pseudo, partners, ids = random_queries(miner, seed=3)
    scales = torch.linspace(0.1, 10.0, len(query_features))[:, None]

    plain = miner.retrieve(query_features, pseudo, partners, ids)
    scaled = miner.retrieve(query_features * scales, pseudo, partners, ids)

    assert torch.equal(plain, scaled)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["representative", "random"])
def test_matches_reference_loop(seed, mode):
    miner = random_bank(seed, mode=mode)
    query_features, pseudo, partners, ids = random_queries(miner, seed)

    batched = miner.retrieve(query_features, pseudo, partners, ids, generator=torch.Generator().manual_seed(seed))
    looped = retrieve_loop(miner, query_features, pseudo, partners, ids, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(batched, looped)
    assert (batched >= 0).any()
    assert (batched == -1).any()


def count_tied_slots(miner, query_features, pseudo, partners, ids):
    """Slots whose U has two or more rows at the maximum similarity."""
    tied = 0
    for b in range(len(pseudo)):
        for partner in partners[b].tolist():
            if partner < 0:
                continue
            pair = {int(pseudo[b]), partner}
            rows = [
                row
                for row in range(miner.num_rows)
                if {int(miner.true_labels[row]), int(miner.pseudo_labels[row])} == pair
                and int(miner.sample_ids[row]) != int(ids[b])
            ]
            similarities = [float(miner.features[row] @ query_features[b]) for row in rows]
            tied += len(rows) > 1 and similarities.count(max(similarities)) > 1
    return tied


def test_parity_data_has_ties_and_self_hits():
    """The random bank really contains the hard cases that the parity test relies on."""
    miner = random_bank(0)
    query_features, pseudo, partners, ids = random_queries(miner, 0)

    with_ids = miner.retrieve(query_features, pseudo, partners, ids)
    without_ids = miner.retrieve(query_features, pseudo, partners)

    assert count_tied_slots(miner, query_features, pseudo, partners, ids) > 0
    assert not torch.equal(with_ids, without_ids)


def test_results_are_members_of_the_pair():
    miner = random_bank(5)
    query_features, pseudo, partners, ids = random_queries(miner, 5)

    result = miner.retrieve(query_features, pseudo, partners, ids)

    for b, j in torch.nonzero(result >= 0).tolist():
        row = int(result[b, j])
        found = {int(miner.true_labels[row]), int(miner.pseudo_labels[row])}
        assert found == {int(pseudo[b]), int(partners[b, j])}
        assert int(miner.sample_ids[row]) != int(ids[b])


def test_small_chunks_give_same_result():
    miner = random_bank(6)
    chunked = random_bank(6, chunk_size=3)
    query_features, pseudo, partners, ids = random_queries(miner, 6)

    assert torch.equal(
        miner.retrieve(query_features, pseudo, partners, ids),
        chunked.retrieve(query_features, pseudo, partners, ids),
    )


def test_random_mode_is_uniform():
    miner = hand_bank(mode="random")
    draws = 3000
    query = one_hot([0]).expand(draws, 4)
    pseudo = torch.zeros(draws, dtype=torch.long)
    partners = torch.ones(draws, 1, dtype=torch.long)

    result = miner.retrieve(query, pseudo, partners, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(result.flatten(), minlength=7)

    # U of pair (0, 1) = rows 0, 1, 2: each expected 1000 times, binomial sd about 26
    assert counts[[0, 1, 2]].tolist() == pytest.approx([1000, 1000, 1000], abs=130)
    assert counts.sum() == draws


def test_random_mode_is_reproducible():
    first = random_bank(7, mode="random")
    second = random_bank(7, mode="random")
    query_features, pseudo, partners, ids = random_queries(first, 7)

    assert torch.equal(
        first.retrieve(query_features, pseudo, partners, ids),
        second.retrieve(query_features, pseudo, partners, ids),
    )


def test_eval_mode_raises():
    miner = hand_bank().eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        miner.retrieve(one_hot([0]), torch.tensor([0]), torch.tensor([[1]]))


def test_eval_mode_allowed_explicitly():
    miner = hand_bank().eval()
    miner.allow_eval_retrieval = True

    assert miner.retrieve(one_hot([0]), torch.tensor([0]), torch.tensor([[1]])).tolist() == [[0]]


def test_bank_tensors_are_buffers():
    miner = hand_bank()
    buffers = dict(miner.named_buffers())

    assert {"features", "true_labels", "pseudo_labels", "sample_ids"} <= set(buffers)
    assert miner.state_dict() == {}
    assert miner.double().features.dtype == torch.float64


def test_bank_features_are_normalised():
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    miner = SampleConfusionMiner(features, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), 2)

    assert torch.allclose(miner.features, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_invalid_bank_raises():
    features = torch.randn(3, 4)
    labels = torch.tensor([0, 1, 2])

    with pytest.raises(ValueError, match="true_labels"):
        SampleConfusionMiner(features, labels[:2], labels, torch.arange(3), 3)
    with pytest.raises(ValueError, match=r"pseudo_labels must lie in \[0, 3\)"):
        SampleConfusionMiner(features, labels, torch.tensor([0, 1, 3]), torch.arange(3), 3)
    with pytest.raises(ValueError, match="duplicates"):
        SampleConfusionMiner(features, labels, labels, torch.tensor([5, 5, 6]), 3)


def test_invalid_query_raises():
    miner = hand_bank()

    with pytest.raises(ValueError, match="query_features"):
        miner.retrieve(torch.randn(1, 5), torch.tensor([0]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="partner_classes must lie"):
        miner.retrieve(one_hot([0]), torch.tensor([0]), torch.tensor([[4]]))
    with pytest.raises(ValueError, match="pseudo label"):
        miner.retrieve(one_hot([0]), torch.tensor([1]), torch.tensor([[1]]))


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="mode='nearest'"):
        SAMConfig(mode="nearest")
