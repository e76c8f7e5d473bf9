"""Semantic prompt sources: commonality and difference sentences for class pairs.

CAPT's Semantic Confusion Miner describes each confusion pair (a, b) with two kinds of
text: commonality sentences (what a and b share) and difference sentences (what
distinguishes a from b). This module loads, validates and builds those sentences. Two file shapes
are read.

Per-class shape, as the CAPT authors ship it (an LLM writes the sentences)::

    {"T-shirt/top": ["A T-shirt has short sleeves.", ...], "Trouser": [...], ...}

Pair shape, defined by this project (format ``capt-pairs/1``)::

    {
      "format": "capt-pairs/1",
      "classes": ["T-shirt/top", "Trouser", ...],
      "commonality": {"T-shirt/top": {"Trouser": ["Both ...", ...], ...}, ...},
      "difference": {"T-shirt/top": {"Trouser": ["A T-shirt ... unlike trousers.", ...], ...}, ...},
      "meta": {...}
    }

- ``classes`` lists every class name once, in label order.
- ``commonality[a][b]`` contains the sentences of the unordered pair {a, b}. Each pair
  appears once, with ``a`` listed before ``b`` in ``classes``. The reversed nesting is
  also accepted, but a pair given in both orders is an error.
- ``difference[a][b]`` holds sentences on how ``a`` differs from ``b``, so it is
  ordered: both ``difference[a][b]`` and ``difference[b][a]`` must exist.
- ``meta`` is optional free-form provenance (author, generator, date) that the loader
  ignores.

Class names are nested keys rather than joined into one string, so a class name
may contain any character (Fashion-MNIST has "T-shirt/top").

Every loader validates against the dataset's class names. A missing, extra or
misspelled class is an error that suggests the closest name. So are an empty
sentence list, a missing pair, and a sentence longer than the text tower's context
when a tokenizer is given. Pair prompts must cover every class pair of the dataset,
novel classes included, because the confusion bank has no counts for novel classes
and their pairs are found from the probabilities alone.
"""

from __future__ import annotations

import difflib
import importlib.resources
import itertools
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capt_lib.data.fashion_mnist import FASHION_MNIST_CLASSNAMES
from capt_lib.utils.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

PAIR_FORMAT = "capt-pairs/1"
PAIR_FILE_KEYS = ("format", "classes", "commonality", "difference", "meta")
MAX_LISTED = 10  # at most this many missing pairs or unknown words are named in one message

BUILTIN_PROMPTS = {
    # dataset name -> (class names in label order, pair-shape file, per-class file)
    "fashion_mnist": (FASHION_MNIST_CLASSNAMES, "fashion_mnist_pairs.json", "fashion_mnist_classes.json"),
}
BUILTIN_KINDS = ("pairs", "classes")


@dataclass(frozen=True)
class TokenBudget:
    """A token counter and the context length it must fit, for tokenizers without ``encode``."""

    count_tokens: Callable[[str], int]  # text -> number of tokens, start and end of text included
    context_length: int  # maximum number of tokens, as the text tower's positional embedding allows


@dataclass(frozen=True)
class PairPrompts:
    """Commonality and difference sentences for the class pairs of one class set.

    Loaded files cover every pair (the loaders check it). A generator asked for some
    pairs only returns those, and ``missing_pairs`` lists the rest.
    """

    classnames: tuple[str, ...]  # class names in label order
    commonality: dict[tuple[str, str], list[str]]  # (a, b) with a before b in classnames -> sentences
    difference: dict[tuple[str, str], list[str]]  # (a, b) -> sentences on how a differs from b
    source: str = ""  # where the sentences came from: a file path, a template description or an LLM

    def commonality_of(self, a: str, b: str) -> list[str]:
        """Return the commonality sentences of the unordered pair {a, b}."""
        for key in ((a, b), (b, a)):
            if key in self.commonality:
                return self.commonality[key]
        raise ValueError(f"{self.source or 'pair prompts'}: no commonality sentences for the pair ({a!r}, {b!r})")

    def difference_of(self, a: str, b: str) -> list[str]:
        """Return the sentences on how ``a`` differs from ``b``."""
        if (a, b) not in self.difference:
            raise ValueError(f"{self.source or 'pair prompts'}: no difference sentences for ({a!r} vs {b!r})")
        return self.difference[(a, b)]

    def missing_pairs(self) -> list[tuple[str, str, str]]:
        """Return (kind, a, b) for every pair of ``classnames`` without sentences."""
        missing = []
        for a, b in itertools.combinations(self.classnames, 2):
            if (a, b) not in self.commonality and (b, a) not in self.commonality:
                missing.append(("commonality", a, b))
        for a, b in itertools.permutations(self.classnames, 2):
            if (a, b) not in self.difference:
                missing.append(("difference", a, b))
        return missing

    def subset(self, classnames: Sequence[str]) -> "PairPrompts":
        """Return the sentences of the pairs among ``classnames`` (e.g. the base or novel classes), in that order."""
        classnames = tuple(classnames)
        unknown = [name for name in classnames if name not in self.classnames]
        if unknown:
            raise ValueError(
                f"{self.source or 'pair prompts'}: classes {unknown} are not among {list(self.classnames)}"
            )

        commonality = {}
        for a, b in itertools.combinations(classnames, 2):
            commonality[(a, b)] = self.commonality_of(a, b)
        difference = {(a, b): self.difference_of(a, b) for a, b in itertools.permutations(classnames, 2)}
        return PairPrompts(classnames, commonality, difference, self.source)


# Validation helpers


def resolve_token_budget(tokenizer: Any) -> TokenBudget | None:
    """Turn a tokenizer into a ``TokenBudget``, or None when no tokenizer is given."""
    if tokenizer is None or isinstance(tokenizer, TokenBudget):
        return tokenizer

    context_length = getattr(tokenizer, "context_length", None)
    if hasattr(tokenizer, "encode") and isinstance(context_length, int):
        # open_clip's SimpleTokenizer and capt's CompactTokenizer return ids without
        # start and end of text, and tokenizing a text adds both.
        return TokenBudget(lambda text: len(tokenizer.encode(text)) + 2, context_length)

    raise TypeError(
        f"tokenizer of type {type(tokenizer).__name__} cannot count tokens: pass an object with an integer "
        "context_length and encode(text) -> ids without start/end tokens (open_clip's SimpleTokenizer), "
        "a TokenBudget(count_tokens, context_length), or None to skip the length check"
    )


def check_sentences(sentences: Any, where: str, source: str, budget: TokenBudget | None) -> list[str]:
    """Return ``sentences`` as a list after checking it is a non-empty list of short, non-empty strings."""
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{source}: {where} must have a non-empty list of sentences, found {sentences!r}")

    for sentence in sentences:
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError(f"{source}: {where} has an empty or non-text sentence {sentence!r}")
        if budget is not None:
            n_tokens = budget.count_tokens(sentence)
            if n_tokens > budget.context_length:
                raise ValueError(
                    f"{source}: {where} has the sentence {sentence!r} of {n_tokens} tokens (start and end "
                    f"of text included), more than the text tower's context length {budget.context_length}; "
                    "shorten it"
                )
    return list(sentences)


def _suggestion(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_class_set(found: Sequence[str], classnames: Sequence[str], source: str, what: str) -> None:
    """Raise a ValueError listing the classes missing from or extra in ``found``."""
    duplicates = sorted({name for name in found if list(found).count(name) > 1})
    if duplicates:
        raise ValueError(f"{source}: {what} lists the classes {duplicates} more than once")

    extra = [name for name in found if name not in classnames]
    missing = [name for name in classnames if name not in found]
    if not extra and not missing:
        return

    problems = [f"unknown class {name!r}{_suggestion(name, missing or classnames)}" for name in extra]
    if missing:
        problems.append(f"missing classes {missing}")
    raise ValueError(
        f"{source}: {what} does not match the dataset's classes: {'; '.join(problems)}. "
        f"The dataset's classes are {list(classnames)}"
    )


def _check_classnames(classnames: Sequence[str]) -> tuple[str, ...]:
    classnames = tuple(classnames)
    if len(classnames) < 2:
        raise ValueError(f"semantic prompts need at least 2 classes, got {list(classnames)}")
    if len(set(classnames)) != len(classnames) or not all(isinstance(c, str) and c for c in classnames):
        raise ValueError(f"class names must be distinct non-empty strings, got {list(classnames)}")
    return classnames


def _warn_unknown_words(texts: Iterable[str], tokenizer: Any, source: str) -> None:
    """Warn about words outside a compact tokenizer's vocabulary, which all encode as <unk>."""
    if not hasattr(tokenizer, "unknown_tokens"):
        return
    unknown = tokenizer.unknown_tokens(list(texts))
    if unknown:
        warnings.warn(
            f"{source}: {len(unknown)} words are outside the tokenizer's vocabulary and encode as <unk>, "
            f"so the text tower cannot tell them apart: {unknown[:MAX_LISTED]}",
            stacklevel=3,
        )


def _read_object(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"semantic prompt file {path} not found")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a semantic prompt file must contain a JSON object, found {type(data).__name__}")
    return data


# Per-class shape


def parse_class_descriptions(
    data: Mapping[str, Any], classnames: Sequence[str], tokenizer: Any = None, source: str = "class descriptions"
) -> dict[str, list[str]]:
    """Validate a per-class mapping {class name: [sentence, ...]} against ``classnames``.

    The result maps each class name to its sentences, in the order of ``classnames``.
    """
    classnames = _check_classnames(classnames)
    budget = resolve_token_budget(tokenizer)
    _check_class_set(list(data), classnames, source, "the class descriptions")

    descriptions = {name: check_sentences(data[name], f"class {name!r}", source, budget) for name in classnames}
    _warn_unknown_words(itertools.chain(*descriptions.values()), tokenizer, source)
    return descriptions


def load_class_descriptions(
    path: str | os.PathLike, classnames: Sequence[str], tokenizer: Any = None
) -> dict[str, list[str]]:
    """Read a per-class file {class name: [sentence, ...]} (the CAPT authors' shape) and validate it."""
    return parse_class_descriptions(_read_object(path), classnames, tokenizer, source=str(path))


def _lowercase_first(sentence: str) -> str:
    # "A T-shirt has ..." becomes "a T-shirt has ...". An acronym such as "UV ..." keeps its case.
    if len(sentence) > 1 and sentence[0].isupper() and not sentence[1].isupper():
        return sentence[0].lower() + sentence[1:]
    return sentence


def _article(name: str) -> str:
    # NOTE: goes by the first letter, so "hour glass" gets "a" and "unicorn" gets "an".
    return "an" if name[:1].lower() in "aeiou" else "a"


def pair_prompts_from_class_descriptions(
    class_descriptions: Mapping[str, Sequence[str]] | str | os.PathLike,
    classnames: Sequence[str],
    tokenizer: Any = None,
    source: str | None = None,
) -> PairPrompts:
    """Build pair sentences from per-class descriptions with two templates.

    - Commonality of {a, b}: the descriptions of a followed by those of b. Their
      averaged text feature is the pair's centre in text space, which keeps what the
      two classes share and averages out what separates them.
    - Difference of a from b: each description d of a as "Unlike a {b}, {d}", so the
      sentence states a's attributes and names the class they set it apart from.

    ``class_descriptions`` is a mapping or a path to a per-class file, and ``source``
    names it in messages (by default the path). The template sentences are validated
    against ``tokenizer`` too, because the prefix makes them longer than the descriptions.
    """
    if isinstance(class_descriptions, (str, os.PathLike)):
        source = source or str(class_descriptions)
        descriptions = load_class_descriptions(class_descriptions, classnames, tokenizer)
    else:
        source = source or "class descriptions"
        descriptions = parse_class_descriptions(class_descriptions, classnames, tokenizer, source)
    classnames = tuple(classnames)
    budget = resolve_token_budget(tokenizer)

    commonality = {}
    for a, b in itertools.combinations(classnames, 2):
        commonality[(a, b)] = descriptions[a] + descriptions[b]

    difference = {}
    for a, b in itertools.permutations(classnames, 2):
        sentences = [f"Unlike {_article(b)} {b}, {_lowercase_first(d)}" for d in descriptions[a]]
        difference[(a, b)] = check_sentences(sentences, f"difference template ({a!r} vs {b!r})", source, budget)

    return PairPrompts(classnames, commonality, difference, source=f"templates over {source}")


# Pair shape


def _parse_pair_section(
    section: Any,
    kind: str,
    classnames: tuple[str, ...],
    source: str,
    budget: TokenBudget | None,
) -> dict[tuple[str, str], list[str]]:
    """Read ``commonality`` or ``difference`` {a: {b: [sentences]}} into a dict keyed by (a, b)."""
    if not isinstance(section, dict):
        raise ValueError(f"{source}: {kind!r} must be an object {{class: {{class: [sentences]}}}}")
    ordered = kind == "difference"

    pairs = {}
    for a, inner in section.items():
        if a not in classnames:
            raise ValueError(f"{source}: {kind} names the unknown class {a!r}{_suggestion(a, classnames)}")
        if not isinstance(inner, dict):
            raise ValueError(f"{source}: {kind}[{a!r}] must be an object {{class: [sentences]}}")

        for b, sentences in inner.items():
            if b not in classnames:
                raise ValueError(
                    f"{source}: {kind}[{a!r}] names the unknown class {b!r}{_suggestion(b, classnames)}"
                )
            if a == b:
                raise ValueError(f"{source}: {kind}[{a!r}][{b!r}] pairs a class with itself")

            key = (a, b) if ordered or classnames.index(a) < classnames.index(b) else (b, a)
            if key in pairs:
                raise ValueError(f"{source}: the {kind} pair ({a!r}, {b!r}) is given twice (once in each order)")
            where = f"{kind} pair ({a!r} vs {b!r})" if ordered else f"{kind} pair ({a!r}, {b!r})"
            pairs[key] = check_sentences(sentences, where, source, budget)
    return pairs


def _raise_if_incomplete(prompts: PairPrompts, source: str) -> None:
    missing = prompts.missing_pairs()
    if not missing:
        return
    listed = ", ".join(f"{kind} ({a!r}, {b!r})" for kind, a, b in missing[:MAX_LISTED])
    more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    raise ValueError(
        f"{source}: {len(missing)} class pairs have no sentences: {listed}{more}. Every pair of the "
        "dataset's classes needs them, novel classes included, because test images of any class can "
        "fall into any pair"
    )


def parse_pair_prompts(
    data: Mapping[str, Any], classnames: Sequence[str], tokenizer: Any = None, source: str = "pair prompts"
) -> PairPrompts:
    """Validate a ``capt-pairs/1`` object against ``classnames`` and return its sentences."""
    classnames = _check_classnames(classnames)
    budget = resolve_token_budget(tokenizer)

    unknown_keys = [key for key in data if key not in PAIR_FILE_KEYS]
    if unknown_keys:
        raise ValueError(
            f"{source}: unknown keys {unknown_keys}; a {PAIR_FORMAT} file has the keys {list(PAIR_FILE_KEYS)}"
        )
    if data.get("format") != PAIR_FORMAT:
        raise ValueError(f"{source}: format {data.get('format')!r} is not supported; expected {PAIR_FORMAT!r}")
    for key in ("classes", "commonality", "difference"):
        if key not in data:
            raise ValueError(f"{source}: the key {key!r} is missing; a {PAIR_FORMAT} file needs it")
    if not isinstance(data["classes"], list):
        raise ValueError(f"{source}: 'classes' must be a list of class names")
    _check_class_set(data["classes"], classnames, source, "'classes'")

    prompts = PairPrompts(
        classnames=classnames,
        commonality=_parse_pair_section(data["commonality"], "commonality", classnames, source, budget),
        difference=_parse_pair_section(data["difference"], "difference", classnames, source, budget),
        source=source,
    )
    _raise_if_incomplete(prompts, source)

    sentences = itertools.chain(*prompts.commonality.values(), *prompts.difference.values())
    _warn_unknown_words(sentences, tokenizer, source)
    return prompts


def load_pair_prompts(path: str | os.PathLike, classnames: Sequence[str], tokenizer: Any = None) -> PairPrompts:
    """Read a ``capt-pairs/1`` file and validate it against ``classnames``."""
    return parse_pair_prompts(_read_object(path), classnames, tokenizer, source=str(path))


def load_semantic_prompts(
    path: str | os.PathLike, classnames: Sequence[str], tokenizer: Any = None
) -> PairPrompts:
    """Read a prompt file of either shape and return pair sentences.

    A file whose ``format`` value is a string is read as the pair shape. Any other
    object is read as the per-class shape and turned into pairs with the templates of
    ``pair_prompts_from_class_descriptions``.
    """
    data = _read_object(path)
    if isinstance(data.get("format"), str):
        return parse_pair_prompts(data, classnames, tokenizer, source=str(path))

    logger.info("%s has the per-class shape; building pair sentences from templates", path)
    return pair_prompts_from_class_descriptions(path, classnames, tokenizer)


def pair_prompts_to_json(prompts: PairPrompts, meta: Mapping[str, Any] | None = None) -> dict:
    """Return ``prompts`` as a ``capt-pairs/1`` object that ``parse_pair_prompts`` reads back."""
    commonality: dict[str, dict[str, list[str]]] = {}
    for (a, b), sentences in prompts.commonality.items():
        commonality.setdefault(a, {})[b] = list(sentences)
    difference: dict[str, dict[str, list[str]]] = {}
    for (a, b), sentences in prompts.difference.items():
        difference.setdefault(a, {})[b] = list(sentences)

    return {
        "format": PAIR_FORMAT,
        "classes": list(prompts.classnames),
        "commonality": commonality,
        "difference": difference,
        "meta": {"source": prompts.source, **(meta or {})},
    }


def save_pair_prompts(prompts: PairPrompts, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``prompts`` to a ``capt-pairs/1`` file, atomically."""
    return atomic_write_json(path, pair_prompts_to_json(prompts, meta))


# Files shipped with the package


def _read_builtin(name: str, kind: str) -> tuple[dict, str]:
    """Return the parsed JSON of a prompt file in ``capt_lib/assets/prompts`` and its name for messages."""
    if name not in BUILTIN_PROMPTS:
        raise ValueError(f"no built-in semantic prompts for dataset {name!r}; available: {sorted(BUILTIN_PROMPTS)}")
    if kind not in BUILTIN_KINDS:
        raise ValueError(f"kind={kind!r} is invalid; choose one of {list(BUILTIN_KINDS)}")

    _, pairs_file, classes_file = BUILTIN_PROMPTS[name]
    filename = pairs_file if kind == "pairs" else classes_file
    source = f"capt_lib/assets/prompts/{filename}"
    resource = importlib.resources.files("capt_lib").joinpath("assets", "prompts", filename)
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"built-in prompt file {source} is missing from the installed package") from e

    try:
        return json.loads(text), source
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from e


def load_builtin_prompts(name: str = "fashion_mnist", kind: str = "pairs", tokenizer: Any = None) -> PairPrompts:
    """Load the pair sentences shipped for dataset ``name``.

    ``kind="pairs"`` reads the hand-written pair file. ``kind="classes"`` reads the
    per-class file and builds the pairs from templates, for comparing the two sources.
    """
    data, source = _read_builtin(name, kind)
    classnames = BUILTIN_PROMPTS[name][0]
    if kind == "pairs":
        return parse_pair_prompts(data, classnames, tokenizer, source=source)
    return pair_prompts_from_class_descriptions(data, classnames, tokenizer, source=source)
