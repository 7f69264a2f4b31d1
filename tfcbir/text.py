"""Short texts for messages: a list cut to its first items, an exception on one line.

Warnings and one-line UserErrors name what went wrong without flooding the terminal: a list of
thousands of missing files shows its first few and how many more there are, and an exception
from a library (keras-hub, Pillow, h5py) shows its message on one line, cut to a length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def shorten(items: Sequence | Iterable, limit: int) -> str:
    """The first ``limit`` items joined by ", ", then " and N more" when there are N more.

    ``shorten(["a", "b", "c"], 2)`` is ``"a, b and 1 more"``; items are shown with ``str``.
    """
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (its type's name when it has none), cut to ``limit``
    characters ("..." at the end when cut), for a one-line UserError."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
