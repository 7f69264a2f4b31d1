"""The from-scratch text tower's tokenizer: words of the training captions, saved with the run.

Lower-cased text is split into words (runs of letters and digits) and single punctuation marks.
The vocabulary is built from the training captions: four special tokens, then every word by
falling count (ties in alphabetical order), up to ``vocab_size`` entries in all; so the same
captions always give the same vocabulary. A caption becomes ``max_length`` token ids:

    [start] w_1 ... w_n [end] [pad] ... [pad]        (pad is 0)

cut to ``max_length - 2`` words when longer. A word outside the vocabulary becomes ``[unk]``
(:meth:`WordTokenizer.unknown_words` names them, so a search front end can say so).

The tokenizer is plain data (a JSON file in the run folder, :meth:`WordTokenizer.save`), so
embedding and queries use exactly the vocabulary the run trained with. No TensorFlow here.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tfcbir import UserError
from tfcbir.files import atomic_output

PAD, UNK, START, END = "[pad]", "[unk]", "[start]", "[end]"
SPECIALS = (PAD, UNK, START, END)  # ids 0, 1, 2, 3
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]|_", re.UNICODE)
KIND = "words"


def split_words(text: str) -> list[str]:
    """``text`` lower-cased and split into words and punctuation marks."""
    return _TOKEN.findall(text.lower())


class WordTokenizer:
    """Captions -> ``(B, max_length)`` int32 token ids over a fixed word vocabulary."""

    def __init__(self, vocabulary: list[str], max_length: int):
        if list(vocabulary[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        if max_length < 3:
            raise ValueError(
                f"max_length must be at least 3 (start, a word, end); got {max_length}"
            )
        self.vocabulary = list(vocabulary)
        self.max_length = int(max_length)
        self._ids = {word: i for i, word in enumerate(self.vocabulary)}
        if len(self._ids) != len(self.vocabulary):
            raise ValueError("the vocabulary repeats a word")

    @classmethod
    def build(cls, texts: Iterable[str], *, vocab_size: int, max_length: int) -> WordTokenizer:
        """The tokenizer of ``texts`` (the training captions): the ``vocab_size - 4`` most
        frequent words (ties alphabetical) after the special tokens."""
        if vocab_size <= len(SPECIALS):
            raise ValueError(f"vocab_size must exceed {len(SPECIALS)}; got {vocab_size}")
        counts = Counter(word for text in texts for word in split_words(text))
        ranked = sorted(counts, key=lambda word: (-counts[word], word))
        return cls(list(SPECIALS) + ranked[: vocab_size - len(SPECIALS)], max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(B, max_length)`` int32 token ids of B texts (see the module docstring)."""
        out = np.zeros((len(texts), self.max_length), np.int32)
        unk, start, end = self._ids[UNK], self._ids[START], self._ids[END]
        for row, text in enumerate(texts):
            words = split_words(text)[: self.max_length - 2]
            ids = [start] + [self._ids.get(w, unk) for w in words] + [end]
            out[row, : len(ids)] = ids
        return out

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary (each once, in order)."""
        return list(dict.fromkeys(w for w in split_words(text) if w not in self._ids))

    def to_dict(self) -> dict:
        return {"kind": KIND, "max_length": self.max_length, "vocabulary": self.vocabulary}

    @classmethod
    def from_dict(cls, value: dict) -> WordTokenizer:
        if not isinstance(value, dict) or value.get("kind") != KIND:
            raise ValueError(f"not a {KIND} tokenizer")
        return cls(list(value["vocabulary"]), int(value["max_length"]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON, atomically."""
        path = Path(path)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """The tokenizer saved at ``path``; UserError when it is missing or damaged."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UserError(
                f"{path}: the run's tokenizer is missing; train the run (train.py writes it)"
            ) from None
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"{path}: not a readable tokenizer ({error}); train the run again with --restart"
            ) from None

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, WordTokenizer)
            and self.vocabulary == other.vocabulary
            and self.max_length == other.max_length
        )

    __hash__ = None
