"""Tests of the semantic prompt loaders, the template builder and the shipped Fashion-MNIST files."""

import importlib.resources
import itertools
import json
import warnings

import pytest
from open_clip.tokenizer import SimpleTokenizer

from capt_lib.data.fashion_mnist import FASHION_MNIST_CLASSNAMES
from capt_lib.prompts.semantic import (
    PAIR_FORMAT,
    PairPrompts,
    TokenBudget,
    load_builtin_prompts,
    load_class_descriptions,
    load_pair_prompts,
    load_semantic_prompts,
    pair_prompts_from_class_descriptions,
    pair_prompts_to_json,
    resolve_token_budget,
    save_pair_prompts,
)

CLASSES = ("Trouser", "Dress", "Coat")


@pytest.fixture(scope="module")
def clip_tokenizer():
    # A 24-token context is tighter than the default MiniCLIP recipe's 32 tokens.
    return SimpleTokenizer(context_length=24)


def _pair_data(sentence=None):
    """A complete capt-pairs/1 object over CLASSES, with ``sentence`` everywhere when it is given."""
    commonality = {
        "Trouser": {"Dress": ["Both hang from the waist."], "Coat": ["Both are long garments."]},
        "Dress": {"Coat": ["Both reach below the waist.", "Both can have buttons."]},
    }
    difference = {}
    for a, b in itertools.permutations(CLASSES, 2):
        difference.setdefault(a, {})[b] = [f"A {a} is not a {b}."]
    if sentence is not None:
        for section in (commonality, difference):
            for inner in section.values():
                for b in inner:
                    inner[b] = [sentence]
    return {"format": PAIR_FORMAT, "classes": list(CLASSES), "commonality": commonality, "difference": difference}


def _write(tmp_path, data, name="prompts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# Pair shape


def test_pair_file_loads(tmp_path):
    path = _write(tmp_path, _pair_data())
    prompts = load_pair_prompts(path, CLASSES)

    assert prompts.classnames == CLASSES
    assert prompts.commonality_of("Coat", "Dress") == ["Both reach below the waist.", "Both can have buttons."]
    assert prompts.commonality_of("Dress", "Coat") == prompts.commonality_of("Coat", "Dress")
    assert prompts.difference_of("Coat", "Trouser") == ["A Coat is not a Trouser."]
    assert sorted(prompts.commonality) == [("Dress", "Coat"), ("Trouser", "Coat"), ("Trouser", "Dress")]
    assert len(prompts.difference) == 6
    assert prompts.source == str(path)


def test_pair_file_accepts_reversed_commonality(tmp_path):
    data = _pair_data()
    data["commonality"]["Coat"] = {"Dress": data["commonality"].pop("Dress")["Coat"]}
    prompts = load_pair_prompts(_write(tmp_path, data), CLASSES)
    assert prompts.commonality[("Dress", "Coat")] == ["Both reach below the waist.", "Both can have buttons."]


def test_pair_file_rejects_pair_given_twice(tmp_path):
    data = _pair_data()
    data["commonality"]["Coat"] = {"Trouser": ["Again."]}
    with pytest.raises(ValueError, match=r"the commonality pair \('Coat', 'Trouser'\) is given twice"):
        load_pair_prompts(_write(tmp_path, data), CLASSES)


def test_pair_file_misspelled_class_suggests_name(tmp_path):
    data = _pair_data()
    data["classes"][0] = "Trousr"
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as info:
        load_pair_prompts(path, CLASSES)
    message = str(info.value)
    assert str(path) in message
    assert "unknown class 'Trousr' (did you mean 'Trouser'?)" in message
    assert "missing classes ['Trouser']" in message


def test_pair_file_missing_and_extra_classes(tmp_path):
    path = _write(tmp_path, _pair_data())
    with pytest.raises(ValueError, match=r"missing classes \['Sandal'\]"):
        load_pair_prompts(path, CLASSES + ("Sandal",))
    with pytest.raises(ValueError, match=r"unknown class 'Coat'"):
        load_pair_prompts(path, CLASSES[:2])


def test_pair_file_misspelled_pair_key(tmp_path):
    data = _pair_data()
    data["difference"]["Dress"]["Cot"] = data["difference"]["Dress"].pop("Coat")
    expected = r"difference\['Dress'\] names the unknown class 'Cot' \(did you mean 'Coat'\?\)"
    with pytest.raises(ValueError, match=expected):
        load_pair_prompts(_write(tmp_path, data), CLASSES)


def test_pair_file_names_missing_pairs(tmp_path):
    data = _pair_data()
    del data["difference"]["Coat"]["Dress"]
    del data["commonality"]["Trouser"]["Coat"]
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as info:
        load_pair_prompts(path, CLASSES)
    message = str(info.value)
    assert "2 class pairs have no sentences" in message
    assert "commonality ('Trouser', 'Coat')" in message
    assert "difference ('Coat', 'Dress')" in message


def test_pair_file_rejects_empty_sentence_list(tmp_path):
    data = _pair_data()
    data["difference"]["Dress"]["Trouser"] = []
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"difference pair \('Dress' vs 'Trouser'\) must have a non-empty list"):
        load_pair_prompts(path, CLASSES)


def test_pair_file_rejects_blank_sentence(tmp_path):
    data = _pair_data()
    data["commonality"]["Trouser"]["Dress"] = ["Fine.", "  "]
    with pytest.raises(ValueError, match=r"commonality pair \('Trouser', 'Dress'\) has an empty or non-text sentence"):
        load_pair_prompts(_write(tmp_path, data), CLASSES)


def test_pair_file_rejects_long_sentence(tmp_path, clip_tokenizer):
    data = _pair_data()
    long_sentence = "A coat " + "really " * 30 + "differs."
    data["difference"]["Coat"]["Dress"] = [long_sentence]
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as info:
        load_pair_prompts(path, CLASSES, tokenizer=clip_tokenizer)
    message = str(info.value)
    assert str(path) in message
    assert "difference pair ('Coat' vs 'Dress')" in message
    assert long_sentence in message
    assert "context length 24" in message


def test_token_limit_boundary(tmp_path, clip_tokenizer):
    # "one two three four five" is 5 BPE tokens, 7 with start and end of text.
    path = _write(tmp_path, _pair_data("one two three four five"))
    fits = SimpleTokenizer(context_length=7)
    load_pair_prompts(path, CLASSES, tokenizer=fits)
    with pytest.raises(ValueError, match="of 7 tokens"):
        load_pair_prompts(path, CLASSES, tokenizer=SimpleTokenizer(context_length=6))


def test_token_budget_counts_with_callable(tmp_path):
    budget = TokenBudget(count_tokens=lambda text: len(text.split()) + 2, context_length=6)
    data = _pair_data("Both hang down.")
    load_pair_prompts(_write(tmp_path, data), CLASSES, tokenizer=budget)
    data["commonality"]["Trouser"]["Dress"] = ["Both hang from the waist down."]
    with pytest.raises(ValueError, match=r"commonality pair \('Trouser', 'Dress'\) has the sentence .* of 8 tokens"):
        load_pair_prompts(_write(tmp_path, data), CLASSES, tokenizer=budget)


def test_tokenizer_without_counter_is_rejected():
    with pytest.raises(TypeError, match="cannot count tokens"):
        resolve_token_budget(lambda texts: None)


class VocabularyTokenizer:
    """A word-level tokenizer with a fixed vocabulary, reporting the words outside it."""

    context_length = 32
    vocabulary = {"both", "hang", "from", "the", "waist", "."}

    def encode(self, text):
        return [1] * len(text.split())

    def unknown_tokens(self, texts):
        words = [w.strip(".").lower() for t in texts for w in t.split()]
        return list(dict.fromkeys(w for w in words if w not in self.vocabulary))


def test_unknown_words_warn(tmp_path):
    with pytest.warns(UserWarning, match=r"outside the tokenizer's vocabulary.*'are', 'long'"):
        load_pair_prompts(_write(tmp_path, _pair_data()), CLASSES, tokenizer=VocabularyTokenizer())


def test_pair_file_rejects_unknown_key_and_format(tmp_path):
    data = _pair_data()
    data["diference"] = {}
    with pytest.raises(ValueError, match=r"unknown keys \['diference'\]"):
        load_pair_prompts(_write(tmp_path, data), CLASSES)
    data = _pair_data()
    data["format"] = "capt-pairs/0"
    with pytest.raises(ValueError, match=r"format 'capt-pairs/0' is not supported; expected 'capt-pairs/1'"):
        load_pair_prompts(_write(tmp_path, data), CLASSES)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_pair_prompts(tmp_path / "nowhere.json", CLASSES)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_semantic_prompts(broken, CLASSES)


def test_pair_prompts_round_trip(tmp_path):
    prompts = load_pair_prompts(_write(tmp_path, _pair_data()), CLASSES)
    path = save_pair_prompts(prompts, tmp_path / "saved.json", meta={"author": "test"})
    again = load_pair_prompts(path, CLASSES)

    assert again.commonality == prompts.commonality
    assert again.difference == prompts.difference
    assert json.loads(path.read_text())["meta"]["author"] == "test"


def test_subset_keeps_pairs_of_chosen_classes(tmp_path):
    prompts = load_pair_prompts(_write(tmp_path, _pair_data()), CLASSES)
    subset = prompts.subset(["Coat", "Trouser"])

    assert subset.classnames == ("Coat", "Trouser")
    assert subset.commonality == {("Coat", "Trouser"): ["Both are long garments."]}
    assert subset.difference == {
        ("Coat", "Trouser"): ["A Coat is not a Trouser."],
        ("Trouser", "Coat"): ["A Trouser is not a Coat."],
    }
    with pytest.raises(ValueError, match=r"classes \['Bag'\] are not among"):
        prompts.subset(["Bag", "Coat"])


def test_missing_pairs_of_partial_prompts():
    prompts = PairPrompts(("a", "b", "c"), {("a", "b"): ["x"]}, {("a", "b"): ["y"]})
    missing = prompts.missing_pairs()
    assert ("commonality", "a", "c") in missing
    assert ("commonality", "b", "c") in missing
    assert ("difference", "b", "a") in missing
    assert len(missing) == 2 + 5


# Per-class shape


CLASS_DATA = {
    "Trouser": ["Trousers have two legs."],
    "Dress": ["A dress reaches the knees.", "A dress widens at the bottom."],
    "Coat": ["A coat has a collar."],
}


def test_class_file_loads_in_classname_order(tmp_path):
    descriptions = load_class_descriptions(_write(tmp_path, CLASS_DATA), ("Coat", "Dress", "Trouser"))
    assert list(descriptions) == ["Coat", "Dress", "Trouser"]
    assert descriptions["Dress"] == CLASS_DATA["Dress"]


def test_class_file_misspelled_class(tmp_path):
    data = dict(CLASS_DATA)
    data["Dres"] = data.pop("Dress")
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"unknown class 'Dres' \(did you mean 'Dress'\?\)"):
        load_class_descriptions(path, CLASSES)


def test_class_file_rejects_empty_list(tmp_path):
    data = dict(CLASS_DATA, Coat=[])
    with pytest.raises(ValueError, match=r"class 'Coat' must have a non-empty list"):
        load_class_descriptions(_write(tmp_path, data), CLASSES)


def test_templates_build_pairs_from_classes():
    prompts = pair_prompts_from_class_descriptions(CLASS_DATA, CLASSES)

    assert prompts.commonality_of("Trouser", "Dress") == [
        "Trousers have two legs.",
        "A dress reaches the knees.",
        "A dress widens at the bottom.",
    ]
    assert prompts.difference_of("Dress", "Coat") == [
        "Unlike a Coat, a dress reaches the knees.",
        "Unlike a Coat, a dress widens at the bottom.",
    ]
    assert prompts.difference_of("Coat", "Trouser") == ["Unlike a Trouser, a coat has a collar."]
    assert prompts.missing_pairs() == []


def test_semantic_loader_detects_shape(tmp_path):
    from_pairs = load_semantic_prompts(_write(tmp_path, _pair_data(), "pairs.json"), CLASSES)
    from_classes = load_semantic_prompts(_write(tmp_path, CLASS_DATA, "classes.json"), CLASSES)
    assert from_pairs.difference_of("Coat", "Dress") == ["A Coat is not a Dress."]
    assert from_classes.difference_of("Coat", "Dress") == ["Unlike a Dress, a coat has a collar."]


def test_template_sentence_too_long_names_pair():
    budget = TokenBudget(count_tokens=lambda text: len(text.split()) + 2, context_length=8)
    descriptions = {"Trouser": ["Legs."], "Dress": ["Long."], "Coat": ["A coat has a long collar."]}
    # The coat's description is 6 words, 8 tokens, and fits; "Unlike a Trouser, a coat has
    # a long collar." is 9 words, 11 tokens. The other template sentences are 4 words long.
    expected = r"difference template \('Coat' vs 'Trouser'\) has the sentence .* of 11 tokens"
    with pytest.raises(ValueError, match=expected):
        pair_prompts_from_class_descriptions(descriptions, CLASSES, tokenizer=budget)


# Shipped Fashion-MNIST prompts


def test_builtin_pairs_cover_fashion_mnist(clip_tokenizer):
    prompts = load_builtin_prompts("fashion_mnist", tokenizer=clip_tokenizer)

    assert prompts.classnames == FASHION_MNIST_CLASSNAMES
    assert len(prompts.commonality) == 45
    assert len(prompts.difference) == 90
    assert prompts.missing_pairs() == []
    for sentences in itertools.chain(prompts.commonality.values(), prompts.difference.values()):
        assert 1 <= len(sentences) <= 2
        for sentence in sentences:
            assert len(sentence.split()) <= 14, sentence


def test_builtin_classes_build_pairs(clip_tokenizer):
    prompts = load_builtin_prompts("fashion_mnist", kind="classes", tokenizer=clip_tokenizer)

    assert prompts.missing_pairs() == []
    first = prompts.difference_of("Coat", "Ankle boot")[0]
    assert first == "Unlike an Ankle boot, a coat has long sleeves, a collar and buttons."


def test_builtin_class_file_shape():
    resource = importlib.resources.files("capt_lib").joinpath("assets", "prompts", "fashion_mnist_classes.json")
    data = json.loads(resource.read_text(encoding="utf-8"))

    assert list(data) == list(FASHION_MNIST_CLASSNAMES)
    for name, sentences in data.items():
        assert 2 <= len(sentences) <= 4, name
        for sentence in sentences:
            assert len(sentence.split()) <= 14, sentence


def test_builtin_rejects_unknown_dataset():
    expected = r"no built-in semantic prompts for dataset 'cifar10'; available: \['fashion_mnist'\]"
    with pytest.raises(ValueError, match=expected):
        load_builtin_prompts("cifar10")
    with pytest.raises(ValueError, match=r"kind='sentences' is invalid"):
        load_builtin_prompts("fashion_mnist", kind="sentences")


def test_pair_json_matches_format(tmp_path):
    prompts = load_builtin_prompts("fashion_mnist")
    data = pair_prompts_to_json(prompts)
    assert data["format"] == PAIR_FORMAT
    assert data["classes"] == list(FASHION_MNIST_CLASSNAMES)
    assert data["difference"]["Sandal"]["Sneaker"] == prompts.difference_of("Sandal", "Sneaker")


def test_builtin_prompts_use_miniclip_vocabulary():
    # Words outside the offline backbone's compact vocabulary would all encode as <unk>.
    from capt_lib.backbones.miniclip import build_tokenizer, resolve_recipe

    tokenizer = build_tokenizer(resolve_recipe("default"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_builtin_prompts("fashion_mnist", kind="pairs", tokenizer=tokenizer)
        load_builtin_prompts("fashion_mnist", kind="classes", tokenizer=tokenizer)
