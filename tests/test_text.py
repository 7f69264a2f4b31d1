"""tfcbir.text: lists cut to their first items, exceptions on one line."""

from tfcbir.text import one_line, shorten


def test_shorten_names_the_first_items_and_counts_the_rest():
    assert shorten(["a", "b", "c"], 2) == "a, b and 1 more"
    assert shorten(["a", "b"], 2) == "a, b"
    assert shorten([], 3) == ""
    assert shorten((str(i) for i in range(25)), 20).endswith("19 and 5 more")
    assert shorten([3, 7], 1) == "3 and 1 more"


def test_one_line_joins_lines_and_cuts_long_messages():
    assert one_line(ValueError("bad\n  value\tthere")) == "bad value there"
    assert one_line(KeyError()) == "KeyError"
    cut = one_line(RuntimeError("x" * 300), limit=20)
    assert cut == "x" * 17 + "..." and len(cut) == 20
