import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from capt_lib.backbones.tokenizer import CompactTokenizer

CORPUS = ["a photo of a coat.", "a blurred photo of a T-shirt/top with short sleeves."]


@pytest.fixture(scope="module")
def open_clip_bpe():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return CompactTokenizer.from_corpus(CORPUS, context_length=16)


def test_vocabulary_is_sorted_corpus_bpe_ids(tokenizer, open_clip_bpe):
    expected = sorted({i for text in CORPUS for i in open_clip_bpe.encode(text)})
    assert list(tokenizer.bpe_ids) == expected
    assert tokenizer.vocab_size == 3 + len(expected) + 1


def test_eot_is_highest_id(tokenizer):
    tokens = tokenizer(CORPUS + ["coat"])
    assert tokenizer.eot_token_id == tokenizer.vocab_size - 1
    assert int(tokens.max()) == tokenizer.eot_token_id
    for row in tokens:
        eot_position = row.tolist().index(tokenizer.eot_token_id)
        assert int(row.argmax()) == eot_position


def test_ids_match_open_clip_bpe(tokenizer, open_clip_bpe):
    # Compact id 3 + i stands for the i-th smallest BPE id of the corpus.
    for text in CORPUS + ["a coat with short sleeves", "PHOTO of a top"]:
        expected_bpe = open_clip_bpe.encode(text)
        compact = tokenizer.encode(text)
        assert [tokenizer.bpe_ids[i - 3] for i in compact] == expected_bpe


def test_call_layout_sot_ids_eot_padding(tokenizer):
    text = "a photo of a coat."
    tokens = tokenizer(text)
    ids = tokenizer.encode(text)
    assert tokens.shape == (1, 16)
    assert tokens.dtype == torch.long
    expected = [2, *ids, tokenizer.eot_token_id] + [0] * (16 - len(ids) - 2)
    assert tokens[0].tolist() == expected


def test_round_trip_through_decode(tokenizer, open_clip_bpe):
    for text in CORPUS:
        expected = open_clip_bpe.decode(open_clip_bpe.encode(text)).strip()
        assert tokenizer.decode(tokenizer(text)[0].tolist()) == expected


def test_too_long_text_raises(tokenizer):
    text = "a photo of a coat " * 5
    with pytest.raises(ValueError, match=r"is 27 tokens long .* context length 16"):
        tokenizer(text)


def test_truncate_keeps_eot_last(tokenizer):
    text = "a photo of a coat " * 5
    tokens = tokenizer(text, truncate=True)[0]
    full = [2, *tokenizer.encode(text)]
    assert tokens[:15].tolist() == full[:15]
    assert int(tokens[15]) == tokenizer.eot_token_id


def test_unknown_word_maps_to_one_unk(tokenizer):
    ids = tokenizer.encode("a photo of a zebra.")
    assert ids == tokenizer.encode("a photo of a") + [1] + tokenizer.encode(".")
    assert tokenizer.unknown_tokens(["a photo of a zebra.", "a zebra", "a coat with stripes"]) == ["zebra", "stripes"]
    assert tokenizer.unknown_tokens(CORPUS) == []


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = CompactTokenizer.load(path)
    assert loaded.bpe_ids == tokenizer.bpe_ids
    assert loaded.context_length == 16
    assert torch.equal(loaded(CORPUS), tokenizer(CORPUS))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CompactTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format 'other' is not supported"):
        CompactTokenizer.load(bad)


def test_special_bpe_ids_rejected(open_clip_bpe):
    with pytest.raises(ValueError, match="not word-piece ids"):
        CompactTokenizer([open_clip_bpe.eot_token_id], context_length=8)


def test_unknown_word_warned_once(caplog):
    tokenizer = CompactTokenizer.from_corpus(CORPUS, context_length=16)
    with caplog.at_level("WARNING", logger="capt_lib.backbones.tokenizer"):
        tokenizer(["a zebra", "a zebra coat"])
        tokenizer("a zebra or a yak")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "['zebra']" in warnings[0]
    assert "['or', 'yak']" in warnings[1]
