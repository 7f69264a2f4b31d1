"""The config reference page, docs/config.md, kept equal to the schema.

``python -m config.reference`` rewrites the table between the page's ``reference`` markers with
:func:`config.schema.reference_markdown`; ``--check`` only says whether the page is out of date
(exit code 1). ``tests/test_config.py`` runs the same check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config.schema import reference_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def with_reference(page: str) -> str:
    """``page`` with the text between its markers replaced by the schema's table."""
    head, start, rest = page.partition(START)
    _, end, tail = rest.partition(END)
    if not (start and end):
        raise ValueError(f"the page has no {START} ... {END} markers")
    return f"{head}{START}\n{reference_markdown()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    page = PAGE.read_text(encoding="utf-8")
    current = with_reference(page)
    if current == page:
        print(f"{PAGE}: up to date")
        return 0
    if args.check:
        print(f"{PAGE}: out of date; run python -m config.reference")
        return 1
    PAGE.write_text(current, encoding="utf-8")
    print(f"{PAGE}: table regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
