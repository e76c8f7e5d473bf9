"""Tests of the Semantic Confusion Miner: scores, pairs, intensity, context and prompt encoding."""

import math

import pytest
import torch

from capt_lib.confusion.semantic_miner import (
    SEMConfig,
    SemanticConfusionMiner,
    confusion_intensity,
    confusion_scores,
    count_shares,
    encode_pair_prompts,
    top_confusion_classes,
)
from capt_lib.prompts.semantic import PairPrompts

# counts[t, p] = images of true class t predicted as p, used by the hand-worked examples.
COUNTS = torch.tensor([[0, 3, 1], [2, 0, 0], [4, 1, 0]])
PROBS = torch.tensor([[0.50, 0.26, 0.24], [0.30, 0.60, 0.10]])
PSEUDO = torch.tensor([0, 1])

# Expected scores, worked out by hand from S_i = (1 + n_{p,i} / sum_j n_{p,j}) * C_i.
# Image 0 (p=0): row n = counts[0, :] = (_, 3, 1), col n = counts[:, 0] = (_, 2, 4), both = (_, 5, 5).
# Image 1 (p=1): row n = counts[1, :] = (2, _, 0), col n = counts[:, 1] = (3, _, 1), both = (5, _, 1).
INF = float("-inf")
EXPECTED_SCORES = {
    "row": [[INF, 1.75 * 0.26, 1.25 * 0.24], [2.0 * 0.30, INF, 1.0 * 0.10]],
    "col": [[INF, (1 + 2 / 6) * 0.26, (1 + 4 / 6) * 0.24], [1.75 * 0.30, INF, 1.25 * 0.10]],
    "both": [[INF, 1.5 * 0.26, 1.5 * 0.24], [(1 + 5 / 6) * 0.30, INF, (1 + 1 / 6) * 0.10]],
}


@pytest.mark.parametrize("direction", ["row", "col", "both"])
def test_scores_hand_computed(direction):
    scores = confusion_scores(PROBS, PSEUDO, COUNTS, direction)
    torch.testing.assert_close(scores, torch.tensor(EXPECTED_SCORES[direction]))


def test_scores_default_direction_is_both():
    scores = confusion_scores(PROBS, PSEUDO, COUNTS)
    torch.testing.assert_close(scores, torch.tensor(EXPECTED_SCORES["both"]))


def test_direction_changes_top_partner():
    # Image 0 is most confused with class 1 when counting rows, with class 2 when counting columns.
    row = top_confusion_classes(confusion_scores(PROBS, PSEUDO, COUNTS, "row"), k=1)
    col = top_confusion_classes(confusion_scores(PROBS, PSEUDO, COUNTS, "col"), k=1)
    assert row[0, 0].item() == 1
    assert col[0, 0].item() == 2


def test_scores_ignore_diagonal():
    with_diagonal = COUNTS + torch.diag(torch.tensor([7, 9, 5]))
    for direction in ("row", "col", "both"):
        torch.testing.assert_close(
            confusion_scores(PROBS, PSEUDO, with_diagonal, direction),
            torch.tensor(EXPECTED_SCORES[direction]),
        )


@pytest.mark.parametrize("direction", ["row", "col", "both"])
def test_zero_count_row_falls_back_to_probs(direction):
    # Class 2 is never confused in either direction, like a novel class.
    counts = torch.tensor([[0, 3, 0], [2, 0, 0], [0, 0, 0]])
    probs = torch.tensor([[0.2, 0.3, 0.5]])
    scores = confusion_scores(probs, torch.tensor([2]), counts, direction)
    torch.testing.assert_close(scores, torch.tensor([[0.2, 0.3, INF]]))


def test_count_shares_rows_sum_to_one_or_zero():
    counts = torch.tensor([[0, 3, 1], [0, 0, 0], [4, 0, 0]])
    shares = count_shares(counts, "row")
    torch.testing.assert_close(shares, torch.tensor([[0, 0.75, 0.25], [0, 0, 0], [1.0, 0, 0]]))


def test_scores_reject_bad_input():
    with pytest.raises(ValueError, match="direction='diagonal' is invalid"):
        confusion_scores(PROBS, PSEUDO, COUNTS, "diagonal")
    with pytest.raises(ValueError, match="counts has shape"):
        confusion_scores(PROBS, PSEUDO, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        confusion_scores(PROBS, PSEUDO, -COUNTS)
    with pytest.raises(ValueError, match="pseudo_labels must be"):
        confusion_scores(PROBS, torch.tensor([0, 1, 2]), COUNTS)


def test_top_classes_order_and_ties():
    scores = torch.tensor([[INF, 0.2, 0.5, 0.2, 0.1], [0.3, 0.3, INF, 0.3, 0.0]])
    top = top_confusion_classes(scores, k=3)
    assert top.tolist() == [[2, 1, 3], [0, 1, 3]]


def test_top_classes_never_pick_pseudo_label():
    scores = confusion_scores(PROBS, PSEUDO, COUNTS)
    top = top_confusion_classes(scores, k=2)
    assert top.tolist() == [[1, 2], [0, 2]]


def test_top_classes_reject_invalid_k():
    with pytest.raises(ValueError, match=r"k=3 is invalid for 3 classes"):
        top_confusion_classes(torch.zeros(1, 3), k=3)
    with pytest.raises(ValueError, match=r"k=0 is invalid"):
        top_confusion_classes(torch.zeros(1, 3), k=0)


def test_intensity_hand_computed():
    probs = torch.tensor([[0.50, 0.26, 0.24], [1.0, 0.0, 0.0], [0.45, 0.45, 0.10], [0.2, 0.7, 0.1]])
    pseudo = torch.tensor([0, 0, 0, 0])
    intensity = confusion_intensity(probs, pseudo)
    # 1 - (0.5 - 0.26); fully confident; a tie; p is not the argmax, so the value clamps to 1.
    torch.testing.assert_close(intensity, torch.tensor([0.76, 0.0, 1.0, 1.0]))


def _slow_scores(probs, pseudo_labels, counts, direction):
    """Score each image with Python loops, straight from the formula."""
    num_classes = len(counts)
    rows = []
    for probs_row, p in zip(probs.tolist(), pseudo_labels.tolist()):

        def n(i):
            if i == p:
                return 0
            forward, backward = int(counts[p, i]), int(counts[i, p])
            return {"row": forward, "col": backward, "both": forward + backward}[direction]

        total = sum(n(j) for j in range(num_classes))
        row = []
        for i in range(num_classes):
            share = n(i) / total if total else 0.0
            row.append(-math.inf if i == p else (1 + share) * probs_row[i])
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("direction", ["row", "col", "both"])
def test_batched_scores_match_slow_loop(direction):
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 6, (7, 7), generator=generator)
    counts[3] = 0
    counts[:, 3] = 0  # class 3 has no bank confusions at all
    probs = torch.softmax(torch.randn(16, 7, generator=generator), dim=1)
    pseudo = probs.argmax(dim=1)

    batched = confusion_scores(probs, pseudo, counts, direction)
    torch.testing.assert_close(batched, _slow_scores(probs, pseudo, counts, direction))


def _unit_features(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _slow_context(commonality, difference, pseudo, pairs, use_commonality, use_difference):
    contexts = []
    for p, partners in zip(pseudo.tolist(), pairs.tolist()):
        selected = []
        for i in partners:
            if use_commonality:
                selected.append(commonality[p, i])
            if use_difference:
                selected.append(difference[p, i])
        contexts.append(sum(selected) / len(selected))
    return torch.stack(contexts)


@pytest.mark.parametrize("use_commonality, use_difference", [(True, True), (True, False), (False, True)])
def test_miner_context_matches_slow_loop(use_commonality, use_difference):
    commonality = _unit_features((5, 5, 8), seed=1)
    difference = _unit_features((5, 5, 8), seed=2)
    counts = torch.randint(0, 4, (5, 5), generator=torch.Generator().manual_seed(3))
    config = SEMConfig(k=2, use_commonality=use_commonality, use_difference=use_difference)
    miner = SemanticConfusionMiner(counts, commonality, difference, config)
    probs = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(4)), dim=1)

    out = miner(probs)

    assert out.pseudo_labels.tolist() == probs.argmax(dim=1).tolist()
    assert out.pair_classes.shape == (6, 2)
    expected_pairs = top_confusion_classes(_slow_scores(probs, out.pseudo_labels, counts, "both"), k=2)
    assert out.pair_classes.tolist() == expected_pairs.tolist()
    expected_context = _slow_context(
        commonality, difference, out.pseudo_labels, out.pair_classes, use_commonality, use_difference
    )
    torch.testing.assert_close(out.context, expected_context)


def test_miner_without_prompts_gives_zero_context():
    config = SEMConfig(use_commonality=False, use_difference=False)
    miner = SemanticConfusionMiner(COUNTS, _unit_features((3, 3, 4), 0), _unit_features((3, 3, 4), 1), config)
    out = miner(PROBS)
    assert out.context.shape == (2, 4)
    assert torch.count_nonzero(out.context) == 0


def test_miner_outputs_hand_example():
    miner = SemanticConfusionMiner(COUNTS, _unit_features((3, 3, 4), 0), _unit_features((3, 3, 4), 1), SEMConfig(k=1))
    out = miner(PROBS)
    torch.testing.assert_close(out.scores, torch.tensor(EXPECTED_SCORES["both"]))
    assert out.pair_classes.tolist() == [[1], [0]]
    torch.testing.assert_close(out.intensity, torch.tensor([0.76, 0.70]))


def test_miner_without_counts_ranks_by_probs():
    miner = SemanticConfusionMiner(None, _unit_features((3, 3, 4), 0), _unit_features((3, 3, 4), 1))
    out = miner(torch.tensor([[0.1, 0.6, 0.3]]))
    torch.testing.assert_close(out.scores, torch.tensor([[0.1, INF, 0.3]]))
    assert out.pair_classes.tolist() == [[2, 0]]


def test_miner_keeps_state_in_buffers():
    miner = SemanticConfusionMiner(COUNTS, _unit_features((3, 3, 4), 0), _unit_features((3, 3, 4), 1))
    assert sorted(dict(miner.named_buffers())) == ["commonality", "counts", "difference"]
    assert list(miner.parameters()) == []
    assert miner.to(torch.float64).commonality.dtype == torch.float64


def test_miner_rejects_bad_shapes():
    features = _unit_features((3, 3, 4), 0)
    with pytest.raises(ValueError, match="difference has shape"):
        SemanticConfusionMiner(COUNTS, features, features[:, :, :2])
    with pytest.raises(ValueError, match="commonality must be"):
        SemanticConfusionMiner(COUNTS, features[0], features[0])
    with pytest.raises(ValueError, match="k=3 is too large for 3 classes"):
        SemanticConfusionMiner(COUNTS, features, features, SEMConfig(k=3))
    with pytest.raises(ValueError, match="square"):
        SemanticConfusionMiner(torch.zeros(3, 2), features, features)


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="SEMConfig.direction='rows' is invalid"):
        SEMConfig(direction="rows")
    with pytest.raises(ValueError, match="SEMConfig.k=0"):
        SEMConfig(k=0)


# Prompt encoding


CLASSES = ("cat", "dog", "fox")
SENTENCES = {
    "c:cat,dog": ["shared one", "shared two"],
    "c:cat,fox": ["shared three"],
    "c:dog,fox": ["shared one"],  # a sentence reused by two pairs is encoded once
    "d:cat,dog": ["cat not dog"],
    "d:dog,cat": ["dog not cat", "dog differs"],
    "d:cat,fox": ["cat not fox"],
    "d:fox,cat": ["fox not cat"],
    "d:dog,fox": ["dog not fox"],
    "d:fox,dog": ["fox not dog"],
}


def _pair_prompts():
    commonality = {tuple(k[2:].split(",")): v for k, v in SENTENCES.items() if k.startswith("c:")}
    difference = {tuple(k[2:].split(",")): v for k, v in SENTENCES.items() if k.startswith("d:")}
    return PairPrompts(CLASSES, commonality, difference, source="test")


class FakeTextEncoder:
    """Map each sentence to a fixed random vector of norm 3 and record the calls."""

    def __init__(self, dim=6):
        texts = sorted({s for sentences in SENTENCES.values() for s in sentences})
        vectors = torch.randn(len(texts), dim, generator=torch.Generator().manual_seed(0))
        self.table = {text: 3 * v / v.norm() for text, v in zip(texts, vectors)}
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.stack([self.table[t] for t in texts])


def _expected_pair_feature(encoder, sentences):
    units = [encoder.table[s] / encoder.table[s].norm() for s in sentences]
    mean = sum(units) / len(units)
    return mean / mean.norm()


def test_encode_pair_prompts_means_sentence_features():
    encoder = FakeTextEncoder()
    commonality, difference = encode_pair_prompts(encoder, _pair_prompts(), CLASSES)

    assert commonality.shape == (3, 3, 6)
    assert difference.shape == (3, 3, 6)
    torch.testing.assert_close(commonality[0, 1], _expected_pair_feature(encoder, ["shared one", "shared two"]))
    torch.testing.assert_close(commonality[1, 0], commonality[0, 1])
    torch.testing.assert_close(difference[1, 0], _expected_pair_feature(encoder, ["dog not cat", "dog differs"]))
    torch.testing.assert_close(difference[2, 1], _expected_pair_feature(encoder, ["fox not dog"]))
    assert torch.count_nonzero(commonality[[0, 1, 2], [0, 1, 2]]) == 0


def test_encode_pair_prompts_follows_classname_order():
    encoder = FakeTextEncoder()
    commonality, difference = encode_pair_prompts(encoder, _pair_prompts(), ("fox", "cat"))
    assert commonality.shape == (2, 2, 6)
    torch.testing.assert_close(difference[0, 1], _expected_pair_feature(encoder, ["fox not cat"]))
    torch.testing.assert_close(commonality[0, 1], _expected_pair_feature(encoder, ["shared three"]))


def test_encode_pair_prompts_chunks_distinct_sentences():
    encoder = FakeTextEncoder()
    encode_pair_prompts(encoder, _pair_prompts(), CLASSES, chunk_size=4)
    distinct = {s for sentences in SENTENCES.values() for s in sentences}
    assert [len(call) for call in encoder.calls] == [4, 4, 2]
    assert sorted(t for call in encoder.calls for t in call) == sorted(distinct)


def test_encode_pair_prompts_names_missing_pair():
    prompts = _pair_prompts()
    del prompts.difference[("fox", "dog")]
    with pytest.raises(ValueError, match=r"no difference sentences for \('fox' vs 'dog'\)"):
        encode_pair_prompts(FakeTextEncoder(), prompts, CLASSES)


def test_miner_from_prompts_uses_encoded_features():
    encoder = FakeTextEncoder()
    miner = SemanticConfusionMiner.from_prompts(COUNTS, _pair_prompts(), CLASSES, encoder, SEMConfig(k=1))
    out = miner(torch.tensor([[0.1, 0.2, 0.7]]))

    # p = 2 (fox); both-direction counts of fox are (4+1, 1+0) over cat and dog, so cat scores
    # (1 + 5/6) * 0.1 = 0.183 and dog (1 + 1/6) * 0.2 = 0.233: the pair is (fox, dog).
    assert out.pair_classes.tolist() == [[1]]
    expected = (_expected_pair_feature(encoder, ["shared one"]) + _expected_pair_feature(encoder, ["fox not dog"])) / 2
    torch.testing.assert_close(out.context[0], expected)


def test_encode_builtin_prompts_with_clip_text_tower():
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from capt_lib.prompts.semantic import load_builtin_prompts

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=24, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    tokenizer = SimpleTokenizer(context_length=24)

    def encode_text(texts):
        return model.encode_text(tokenizer(texts))

    prompts = load_builtin_prompts("fashion_mnist", tokenizer=tokenizer)
    classnames = prompts.classnames
    commonality, difference = encode_pair_prompts(encode_text, prompts, classnames, chunk_size=64)

    assert commonality.shape == (10, 10, 16)
    off_diagonal = ~torch.eye(10, dtype=torch.bool)
    torch.testing.assert_close(difference.norm(dim=-1)[off_diagonal], torch.ones(90))
    with torch.no_grad():
        sentences = prompts.difference_of("Sneaker", "Ankle boot")
        features = torch.nn.functional.normalize(encode_text(sentences), dim=-1).mean(dim=0)
    expected = features / features.norm()
    torch.testing.assert_close(difference[7, 9], expected, rtol=1e-5, atol=1e-5)
