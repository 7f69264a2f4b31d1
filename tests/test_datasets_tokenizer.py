"""datasets.tokenizer: a deterministic word vocabulary from the training captions, saved with the
run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasets.tokenizer import SPECIALS, WordTokenizer, split_words
from tfcbir import UserError

CAPTIONS = ["A small red triangle.", "a red circle", "a big BLUE circle, at the top"]


def test_words_and_punctuation():
    assert split_words("A small, RED triangle!") == ["a", "small", ",", "red", "triangle", "!"]
    assert split_words("  café au lait  ") == ["café", "au", "lait"]
    assert split_words("t-shirt 42cm snake_case") == [
        "t",
        "-",
        "shirt",
        "42cm",
        "snake",
        "_",
        "case",
    ]


def test_vocabulary_by_count_then_alphabet():
    tokenizer = WordTokenizer.build(CAPTIONS, vocab_size=100, max_length=8)
    # a x3, circle x2, red x2, then count-1 words alphabetically (',' and '.' sort first).
    assert tokenizer.vocabulary == [
        *SPECIALS,
        "a",
        "circle",
        "red",
        ",",
        ".",
        "at",
        "big",
        "blue",
        "small",
        "the",
        "top",
        "triangle",
    ]
    assert WordTokenizer.build(list(reversed(CAPTIONS)), vocab_size=100, max_length=8) == tokenizer
    small = WordTokenizer.build(CAPTIONS, vocab_size=7, max_length=8)
    assert small.vocabulary == [*SPECIALS, "a", "circle", "red"]


def test_encode_pads_truncates_and_marks_unknown_words():
    tokenizer = WordTokenizer.build(CAPTIONS, vocab_size=100, max_length=6)
    ids = tokenizer.encode(["a red circle", "A RED HAT", "a big blue circle at the top", ""])
    v = {w: i for i, w in enumerate(tokenizer.vocabulary)}
    assert ids.dtype == np.int32 and ids.shape == (4, 6)
    assert ids[0].tolist() == [2, v["a"], v["red"], v["circle"], 3, 0]
    assert ids[1].tolist() == [2, v["a"], v["red"], 1, 3, 0]  # hat -> [unk]
    assert ids[2].tolist() == [2, v["a"], v["big"], v["blue"], v["circle"], 3]  # cut to 4 words
    assert ids[3].tolist() == [2, 3, 0, 0, 0, 0]
    assert tokenizer.unknown_words("a red hat, a Hat and a cap") == ["hat", "and", "cap"]


def test_saved_tokenizer_reads_back_and_damage_is_reported(tmp_path):
    tokenizer = WordTokenizer.build(CAPTIONS, vocab_size=100, max_length=8)
    path = tokenizer.save(tmp_path / "run" / "text_tokenizer.json")
    assert WordTokenizer.load(path) == tokenizer
    assert json.loads(path.read_text())["kind"] == "words"
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a readable tokenizer"):
        WordTokenizer.load(path)
    with pytest.raises(UserError, match="tokenizer is missing"):
        WordTokenizer.load(tmp_path / "none.json")
