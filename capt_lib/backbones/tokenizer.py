"""A compact-vocabulary tokenizer on top of open_clip's BPE, for small text towers.

open_clip's ``SimpleTokenizer`` has 49,408 ids, so a text tower built on it spends
most of its parameters on a token embedding whose rows are never trained when the
pretraining corpus is small. ``CompactTokenizer`` runs the same BPE and then maps
the BPE ids that occur in a given corpus onto a dense range:

====================  =========================================================
compact id            meaning
====================  =========================================================
0                     padding (open_clip pads token tensors with zeros)
1                     ``<unk>``: a word with a BPE piece outside the vocabulary
2                     ``<start_of_text>``
3 .. vocab_size - 2   the corpus's BPE ids, in increasing BPE order
vocab_size - 1        ``<end_of_text>``
====================  =========================================================

The end-of-text id is the highest id because open_clip's text towers pool the
token at ``argmax`` of the ids (``text_pool_type="argmax"``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Iterable

import regex
import torch
from open_clip.tokenizer import SimpleTokenizer

from capt_lib.utils.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
SOT_ID = 2
FIRST_WORD_ID = 3  # first compact id given to a corpus BPE token
TOKENIZER_FORMAT = "capt-compact-tokenizer/1"


@functools.lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    # Parsing the 49,152 BPE merges takes seconds on a small CPU, so one instance is shared.
    return SimpleTokenizer(context_length=None)


class CompactTokenizer:
    """Tokenize text with open_clip's BPE into a small, corpus-specific id range.

    Call it like an open_clip tokenizer: ``tokenizer(texts)`` returns a LongTensor of
    shape (N, context_length) holding SOT, the text's ids, EOT and zero padding. A
    word with any BPE piece outside the vocabulary becomes one ``<unk>`` id, and
    ``unknown_tokens(texts)`` lists such words so callers can report them.
    """

    def __init__(self, bpe_ids: Iterable[int], context_length: int):
        """Build the id map from the BPE ids to keep, as ``from_corpus`` collects them."""
        bpe_ids = sorted(set(int(i) for i in bpe_ids))
        bpe = _bpe()
        special = set(bpe.all_special_ids)
        invalid = [i for i in bpe_ids if i < 0 or i >= bpe.vocab_size or i in special]
        if invalid:
            raise ValueError(
                f"CompactTokenizer: BPE ids {invalid[:10]} are not word-piece ids of open_clip's "
                f"SimpleTokenizer; valid ids are 0..{bpe.vocab_size - 1} except the special ids {sorted(special)}"
            )
        if context_length < 3:
            raise ValueError(f"CompactTokenizer: context_length={context_length} must be at least 3 (SOT, a token, EOT)")

        self.context_length = context_length
        self.bpe_ids = tuple(bpe_ids)
        self._to_compact = {bpe_id: FIRST_WORD_ID + i for i, bpe_id in enumerate(bpe_ids)}
        self._to_bpe = {compact: bpe_id for bpe_id, compact in self._to_compact.items()}
        self.pad_token_id = PAD_ID
        self.unk_token_id = UNK_ID
        self.sot_token_id = SOT_ID
        self.eot_token_id = FIRST_WORD_ID + len(bpe_ids)
        self.vocab_size = self.eot_token_id + 1
        self._warned_unknown: set[str] = set()

    @classmethod
    def from_corpus(
        cls, texts: Iterable[str], context_length: int, extra_words: Iterable[str] = ()
    ) -> "CompactTokenizer":
        """Keep every BPE id that occurs in ``texts`` or ``extra_words``."""
        bpe = _bpe()
        ids = set()
        for text in [*texts, *extra_words]:
            ids.update(bpe.encode(text))
        return cls(ids, context_length)

    # Encoding

    def _words(self, text: str) -> list[str]:
        # The same cleaning and word split as SimpleTokenizer.encode, so ids match it.
        bpe = _bpe()
        return regex.findall(bpe.pat, bpe.clean_fn(text))

    def _word_bpe_ids(self, word: str) -> list[int]:
        bpe = _bpe()
        byte_word = "".join(bpe.byte_encoder[b] for b in word.encode("utf-8"))
        return [bpe.encoder[piece] for piece in bpe.bpe(byte_word).split(" ")]

    def _encode_words(self, text: str) -> tuple[list[int], list[str]]:
        ids, unknown = [], []
        for word in self._words(text):
            pieces = self._word_bpe_ids(word)
            if all(piece in self._to_compact for piece in pieces):
                ids.extend(self._to_compact[piece] for piece in pieces)
            else:
                ids.append(UNK_ID)
                unknown.append(word)
        return ids, unknown

    def encode(self, text: str) -> list[int]:
        """Return the compact ids of ``text`` without SOT and EOT, as SimpleTokenizer.encode does."""
        return self._encode_words(text)[0]

    def unknown_tokens(self, texts: str | Iterable[str]) -> list[str]:
        """Return the words of ``texts`` that map to ``<unk>``, each once, in order of first use."""
        if isinstance(texts, str):
            texts = [texts]
        unknown = {}
        for text in texts:
            for word in self._encode_words(text)[1]:
                unknown.setdefault(word, None)
        return list(unknown)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode compact ids into text. Padding, SOT and EOT are dropped, and ``<unk>`` is kept."""
        bpe = _bpe()
        text = []
        for i in (int(i) for i in ids):
            if i in self._to_bpe:
                text.append(bpe.decode([self._to_bpe[i]]))
            elif i == UNK_ID:
                text.append("<unk> ")
        return "".join(text).strip()

    def __call__(self, texts: str | list[str], truncate: bool = False) -> torch.Tensor:
        """Tokenize ``texts`` into a (N, context_length) LongTensor: SOT, ids, EOT, zero padding.

        A text longer than the context raises ValueError unless ``truncate=True``, in
        which case it is cut and its last kept position becomes EOT, as open_clip does.
        """
        if isinstance(texts, str):
            texts = [texts]
        result = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # (N, context_length)

        for row, text in enumerate(texts):
            words, unknown = self._encode_words(text)
            self._warn_unknown(unknown)
            ids = [SOT_ID, *words, self.eot_token_id]
            if len(ids) > self.context_length:
                if not truncate:
                    raise ValueError(
                        f"text {text!r} is {len(ids)} tokens long including start and end of text, "
                        f"more than the context length {self.context_length}; shorten it or pass truncate=True"
                    )
                ids = ids[: self.context_length - 1] + [self.eot_token_id]
            result[row, : len(ids)] = torch.tensor(ids)

        return result

    def _warn_unknown(self, words: list[str]) -> None:
        # One warning per word and tokenizer, so a prompt set reused in a loop does not flood the log.
        new = [word for word in dict.fromkeys(words) if word not in self._warned_unknown]
        if new:
            self._warned_unknown.update(new)
            logger.warning("words outside the tokenizer's vocabulary are tokenized as <unk>: %s", new)

    # Persistence

    def to_dict(self) -> dict:
        return {"format": TOKENIZER_FORMAT, "context_length": self.context_length, "bpe_ids": list(self.bpe_ids)}

    @classmethod
    def from_dict(cls, data: dict) -> "CompactTokenizer":
        if data.get("format") != TOKENIZER_FORMAT:
            raise ValueError(
                f"tokenizer format {data.get('format')!r} is not supported; expected {TOKENIZER_FORMAT!r}"
            )
        return cls(data["bpe_ids"], data["context_length"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary and context length to a JSON file, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompactTokenizer":
        """Read a tokenizer written by ``save``."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} not found")
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a CompactTokenizer file: {e}") from e
