"""Metadata filters: a small expression language over per-image attributes, the attributes read
from ``<root>/metadata.csv``, and the exact top k among the items an expression matches.

An expression compares columns with literals, e.g. ``category == 'tote' and price < 100`` or
``not (colour in ['red', 'blue']) or in_stock == true``. Its grammar (keywords in any case):

    expression  := conjunction ("or" conjunction)*
    conjunction := negation ("and" negation)*
    negation    := "not" negation | "(" expression ")" | condition
    condition   := column ("==" | "!=" | "<" | "<=" | ">" | ">=") literal
                 | column ["not"] "in" "[" [literal ("," literal)* [","]] "]"
    column      := name (letters, digits, _ and ., not starting with a digit) | `any text`
    literal     := 'text' | "text" (a backslash escapes the next character) | number
                 | true | false

so ``not`` binds tighter than ``and``, and ``and`` tighter than ``or``. Text is parsed by a
hand-written tokenizer and a recursive-descent parser; nothing the user writes is evaluated as
Python. A column holds one kind of value, from its NumPy array (:func:`column_kind`): text
(compared as text, by code point), number, date (compared with a quoted ``'YYYY-MM-DD'``) or
true/false (``==``, ``!=``, ``in`` only); a literal of another kind is a one-line UserError.

Missing values (empty cells) behave as SQL's NULL: a comparison with one is unknown, ``not``
of unknown is unknown, ``unknown and false`` is false and ``unknown or true`` is true, and only
true matches. So neither ``price < 100`` nor ``not (price < 100)`` nor ``price != 100`` matches
an item without a price.

:func:`filtered_topk` answers a search with the k best items among those a mask keeps: exactly
(never fewer than k when k match) with :class:`retrieval.search.ExactIndex`, and with any other
index (FAISS) by a candidate pass that widens until k of its candidates match.
"""

from __future__ import annotations

import difflib
import operator
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.lists import csv_rows, relative_to_root
from retrieval.search import ExactIndex, SearchIndex, exclusion_mask
from tfcbir import UserError
from tfcbir.text import shorten

#: The kinds of column :func:`column_kind` tells apart, as messages name them.
KINDS = {"text": "a text", "number": "a number", "date": "a date", "boolean": "a true/false"}
#: How to compare a column of each kind, for the type-mismatch message.
HINTS = {
    "text": "compare it with a quoted string",
    "number": "compare it with a number",
    "date": "compare it with a date in quotes, 'YYYY-MM-DD'",
    "boolean": "compare it with true or false",
}
COMPARISONS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
KEYWORDS = ("and", "or", "not", "in", "true", "false")
#: How deeply parentheses and ``not`` may nest: a bound on the parser's recursion.
MAX_DEPTH = 100
#: The metadata file, in the data root: per-image attributes for filters.
METADATA_FILE = "metadata.csv"
#: Gallery columns the metadata file must have.
PATH_COLUMN = "path"
#: The exact filtered search searches the matching items alone when they are at most this
#: share of the gallery (cheaper than widening a search of the whole gallery).
SUBSET_SHARE = 1 / 4
#: Each widening pass of :func:`filtered_topk` asks for this many times more candidates.
WIDENING = 4

_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![\w.])"
    r"|(?P<name>[^\W\d][\w.]*)"
    r"|(?P<operator>==|!=|<=|>=|<|>)"
    r"|(?P<punctuation>[()\[\],])"
)
#: Characters people reach for from other languages, and what to write instead.
_MISTAKES = {
    "&&": "use and",
    "&": "use and",
    "||": "use or",
    "|": "use or",
    "=": "use == to compare",
    "!": "use not, or != to compare",
}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


# --- tokens ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """One token of an expression: its kind (name, keyword, string, number, operator,
    punctuation, end), its value (the name, the lower-case keyword, the parsed literal, the
    operator or punctuation), and where it starts in the text (0-based) and ends."""

    kind: str
    value: object
    start: int
    end: int
    text: str

    def describe(self) -> str:
        return "the end of the expression" if self.kind == "end" else repr(self.text)


def tokenize(text: str, label: str = "--where") -> list[Token]:
    """The tokens of an expression, ending with an ``end`` token; UserError (naming the
    character and its position) for text that is no token."""
    tokens, position = [], 0
    while position < len(text):
        char = text[position]
        if char in "'\"`":
            token = _quoted(text, position, label)
        else:
            found = _TOKEN.match(text, position)
            if found is None:
                raise _stray(text, position, label)
            kind, value = found.lastgroup, found.group()
            if kind == "space":
                position = found.end()
                continue
            if kind == "number":
                value = float(value) if re.search(r"[.eE]", value) else int(value)
            elif kind == "name" and value.lower() in KEYWORDS:
                kind, value = "keyword", value.lower()
            token = Token(kind, value, position, found.end(), found.group())
        tokens.append(token)
        position = token.end
    tokens.append(Token("end", None, len(text), len(text), ""))
    return tokens


def _quoted(text: str, start: int, label: str) -> Token:
    """A quoted string ('...' or "...", backslash escapes the next character) or a quoted
    column name (`...`, taken as written)."""
    quote, position, chars = text[start], start + 1, []
    while position < len(text) and text[position] != quote:
        if text[position] == "\\" and quote != "`" and position + 1 < len(text):
            position += 1
        chars.append(text[position])
        position += 1
    what = "column name" if quote == "`" else "string"
    if position >= len(text):
        raise UserError(
            f"{label}: the {what} at position {start + 1} has no closing {quote}; "
            f"close it: {text[start:]}{quote}"
        )
    kind = "name" if quote == "`" else "string"
    return Token(kind, "".join(chars), start, position + 1, text[start : position + 1])


def _stray(text: str, position: int, label: str) -> UserError:
    """The error for text at ``position`` that starts no token."""
    word = re.match(r"[^\s()\[\],'\"`]+", text[position:])
    word = word.group() if word else text[position]
    for mistake, advice in _MISTAKES.items():
        if word.startswith(mistake):
            return UserError(f"{label}: {mistake!r} at position {position + 1}: {advice}")
    return UserError(f"{label}: unexpected {word!r} at position {position + 1}")


# --- the parse tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """``column <operator> literal``, or ``column [not] in [literals]`` (operator ``in`` or
    ``not in``); ``literals`` holds the one literal of a comparison. ``source``: its text."""

    column: str
    operator: str
    literals: tuple
    source: str


@dataclass(frozen=True)
class Not:
    operand: object


@dataclass(frozen=True)
class Junction:
    """``and`` or ``or`` (``operator``) of two or more operands."""

    operator: str
    operands: tuple


class _Parser:
    """Recursive descent over the tokens; every method consumes one grammar rule."""

    def __init__(self, text: str, label: str):
        self.text, self.label = text, label
        self.tokens = tokenize(text, label)
        self.at = 0
        self.depth = 0

    @property
    def token(self) -> Token:
        return self.tokens[self.at]

    def take(self) -> Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def is_keyword(self, *words: str) -> bool:
        return self.token.kind == "keyword" and self.token.value in words

    def error(self, expected: str, hint: str = "") -> UserError:
        token = self.token
        return UserError(
            f"{self.label}: expected {expected} at position {token.start + 1}, found "
            f"{token.describe()}{hint}"
        )

    def expression(self):
        if self.token.kind == "end":
            raise UserError(
                f"{self.label}: the expression is empty; write e.g. "
                "category == 'tote' and price < 100"
            )
        tree = self.junction("or")
        if self.token.kind != "end":
            joiner = "" if self.token.value == ")" else "; join conditions with and / or"
            raise UserError(
                f"{self.label}: unexpected {self.token.describe()} at position "
                f"{self.token.start + 1}{joiner}"
            )
        return tree

    def junction(self, word: str):
        """``or`` of conjunctions, or ``and`` of negations."""
        part = (lambda: self.junction("and")) if word == "or" else self.negation
        operands = [part()]
        while self.is_keyword(word):
            self.take()
            operands.append(part())
        return operands[0] if len(operands) == 1 else Junction(word, tuple(operands))

    def negation(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise UserError(
                f"{self.label}: parentheses and not nest deeper than {MAX_DEPTH} at position "
                f"{self.token.start + 1}; simplify the expression"
            )
        if self.is_keyword("not"):
            self.take()
            tree = Not(self.negation())
        elif self.token.value == "(" and self.token.kind == "punctuation":
            self.take()
            tree = self.junction("or")
            if self.token.value != ")" or self.token.kind != "punctuation":
                raise self.error("')' or and / or")
            self.take()
        else:
            tree = self.condition()
        self.depth -= 1
        return tree

    def condition(self) -> Condition:
        if self.token.kind != "name":
            hint = ""
            if self.token.kind == "keyword":
                hint = f" (a keyword; write a column of that name as `{self.token.text}`)"
            raise self.error("a column name", hint)
        column = self.take()
        if self.token.kind == "operator":
            comparison = self.take().value
            literals = (self.literal(),)
        elif self.is_keyword("in") or self.is_keyword("not"):
            comparison = "in" if self.take().value == "in" else "not in"
            if comparison == "not in":
                if not self.is_keyword("in"):
                    raise self.error("in after not")
                self.take()
            literals = self.literal_list()
        else:
            raise self.error(f"a comparison (==, !=, <, <=, >, >=, in, not in) after {column.text}")
        source = self.text[column.start : self.tokens[self.at - 1].end]
        return Condition(column.value, comparison, literals, source)

    def literal(self):
        token = self.token
        if token.kind in ("string", "number"):
            return self.take().value
        if self.is_keyword("true", "false"):
            return self.take().value == "true"
        hint = f" (quote text: '{token.value}')" if token.kind == "name" else ""
        raise self.error("a value (a quoted string, a number, true or false)", hint)

    def literal_list(self) -> tuple:
        if self.token.value != "[" or self.token.kind != "punctuation":
            raise self.error("a list of values in [ ]")
        self.take()
        literals = []
        while not (self.token.value == "]" and self.token.kind == "punctuation"):
            literals.append(self.literal())
            if self.token.value == "," and self.token.kind == "punctuation":
                self.take()
            elif not (self.token.value == "]" and self.token.kind == "punctuation"):
                raise self.error("',' or ']'")
        self.take()
        return tuple(literals)


# --- columns --------------------------------------------------------------------------------------


def column_kind(values: np.ndarray) -> str:
    """The kind of a column (N,): ``number`` (integers or floats; NaN missing), ``date``
    (datetime64; NaT missing), ``boolean`` (bool, or objects that are bools or None), or
    ``text`` (strings, or objects that are strings or None; an all-None column is text).
    ValueError for anything else (a caller's bug, not the user's)."""
    values = np.asarray(values)
    if values.dtype.kind == "b":
        return "boolean"
    if values.dtype.kind in "iuf":
        return "number"
    if values.dtype.kind == "M":
        return "date"
    if values.dtype.kind == "U":
        return "text"
    if values.dtype.kind == "O":
        present = [v for v in values.tolist() if not _is_missing(v)]
        for kind, types in (("text", str), ("boolean", (bool, np.bool_))):
            if all(isinstance(v, types) for v in present):
                return kind
        numbers = (int, float, np.integer, np.floating)
        if all(isinstance(v, numbers) and not isinstance(v, bool) for v in present):
            return "number"
    raise ValueError(f"a column of {values.dtype} values mixes or holds unsupported types")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and value != value)


@dataclass(frozen=True)
class Column:
    """A column ready to compare: its kind, its values (N,) (text as str, numbers float64,
    dates datetime64, booleans bool; missing rows hold a placeholder) and ``missing`` (N,)."""

    kind: str
    values: np.ndarray
    missing: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> Column:
        values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(f"a column must be (N,); got shape {values.shape}")
        kind = column_kind(values)
        if values.dtype.kind == "O":
            missing = np.fromiter((_is_missing(v) for v in values), bool, len(values))
            placeholder = {"text": "", "boolean": False, "number": np.nan}[kind]
            values = np.where(missing, placeholder, values)
            values = values.astype({"text": str, "boolean": bool, "number": np.float64}[kind])
        elif kind == "number":
            values = values.astype(np.float64)
            missing = np.isnan(values)
        elif kind == "date":
            missing = np.isnat(values)
        else:
            missing = np.zeros(len(values), dtype=bool)
        return cls(kind, values, missing)


class Columns:
    """Named columns (name -> (N,) array) prepared once for many filters: each column is
    converted (:class:`Column`) the first time a filter uses it."""

    def __init__(self, columns: Mapping[str, np.ndarray]):
        self.raw = dict(columns)
        lengths = {len(values) for values in self.raw.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths {sorted(lengths)}")
        self._prepared: dict[str, Column] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def names(self) -> list[str]:
        return list(self.raw)

    def column(self, name: str) -> Column:
        if name not in self._prepared:
            self._prepared[name] = Column.of(self.raw[name])
        return self._prepared[name]


# --- filters --------------------------------------------------------------------------------------


class Filter:
    """A parsed expression (:func:`parse_filter`); ``mask`` applies it to columns."""

    def __init__(self, text: str, tree, label: str):
        self.text, self.tree, self.label = text, tree, label

    def columns(self) -> list[str]:
        """The column names the expression uses, in order of appearance, once each."""
        names: dict[str, None] = {}
        stack = [self.tree]
        while stack:
            node = stack.pop()
            if isinstance(node, Condition):
                names[node.column] = None
            else:
                stack.extend(reversed([node.operand] if isinstance(node, Not) else node.operands))
        return list(names)

    def mask(self, columns: Columns | Mapping[str, np.ndarray]) -> np.ndarray:
        """(N,) bool: the rows the expression is true for. UserError (one line) for a column
        not in ``columns`` (naming the closest) or a literal of the wrong kind."""
        if not isinstance(columns, Columns):
            columns = Columns(columns)
        for name in self.columns():
            if name not in columns:
                raise self.unknown_column(name, columns.names())
        true, _ = self.truth(self.tree, columns)
        return true

    def truth(self, node, columns: Columns) -> tuple[np.ndarray, np.ndarray]:
        """(true, false) masks (N,) of a node: a row in neither is unknown (a missing value)."""
        if isinstance(node, Condition):
            return self.condition_truth(node, columns.column(node.column))
        if isinstance(node, Not):
            true, false = self.truth(node.operand, columns)
            return false, true
        true, false = self.truth(node.operands[0], columns)
        for operand in node.operands[1:]:
            more_true, more_false = self.truth(operand, columns)
            if node.operator == "and":  # Kleene: false if either is false
                true, false = true & more_true, false | more_false
            else:
                true, false = true | more_true, false & more_false
        return true, false

    def condition_truth(self, node: Condition, column: Column) -> tuple[np.ndarray, np.ndarray]:
        literals = [self.literal_for(node, column, literal) for literal in node.literals]
        if node.operator in ("in", "not in"):
            hit = np.zeros(len(column.values), dtype=bool)
            if literals:  # an array of the literals' own type: a column's <U4 would cut them
                hit = np.isin(column.values, np.array(literals))
            if node.operator == "not in":
                hit = ~hit
        else:
            hit = COMPARISONS[node.operator](column.values, literals[0])
        known = ~column.missing
        return hit & known, ~hit & known

    def literal_for(self, node: Condition, column: Column, literal):
        """The literal as the column's values compare with it; UserError when the kinds differ."""
        kind = column.kind
        if kind == "boolean" and node.operator not in ("==", "!=", "in", "not in"):
            raise UserError(
                f"{self.label}: {node.source}: {node.column} is a true/false column; "
                "compare it with == or != (or in)"
            )
        if kind == "date" and isinstance(literal, str):
            if _DATE.fullmatch(literal):
                try:
                    return np.datetime64(literal, "D")
                except ValueError:
                    pass
            raise UserError(
                f"{self.label}: {node.source}: {literal!r} is not a date; write dates as "
                "'YYYY-MM-DD'"
            )
        fits = {
            "text": isinstance(literal, str),
            "number": isinstance(literal, (int, float)) and not isinstance(literal, bool),
            "boolean": isinstance(literal, bool),
        }.get(kind, False)
        if not fits:
            raise UserError(
                f"{self.label}: {node.source}: {node.column} is {KINDS[kind]} column; {HINTS[kind]}"
            )
        return float(literal) if kind == "number" else literal

    def sql(self, columns: Columns, names: Mapping[str, str]) -> str:
        """The expression as an SQL condition (LanceDB's, DataFusion's dialect) with the same
        meaning, missing values as NULL included; ``names`` maps each column to the SQL
        column that holds it. Checked against ``columns`` first (empty columns of the right
        kinds do): UserError (one line) as :meth:`mask` gives."""
        self.mask(columns)
        return self.sql_of(self.tree, columns, names)

    def sql_of(self, node, columns: Columns, names: Mapping[str, str]) -> str:
        if isinstance(node, Not):
            return f"(NOT {self.sql_of(node.operand, columns, names)})"
        if isinstance(node, Junction):
            joined = f" {node.operator.upper()} ".join(
                self.sql_of(operand, columns, names) for operand in node.operands
            )
            return f"({joined})"
        column = columns.column(node.column)
        name = names[node.column]
        literals = [
            sql_literal(self.literal_for(node, column, literal)) for literal in node.literals
        ]
        if node.operator in ("in", "not in"):
            if not literals:  # false (true for not in) where known, NULL where missing
                return f"({name} {'<>' if node.operator == 'in' else '='} {name})"
            return f"({name} {node.operator.upper()} ({', '.join(literals)}))"
        operator = {"==": "=", "!=": "<>"}.get(node.operator, node.operator)
        return f"({name} {operator} {literals[0]})"

    def unknown_column(self, name: str, names: list[str]) -> UserError:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = shorten(names, 20)
        return UserError(f"{self.label}: no column {name!r}{hint} (columns: {shown or 'none'})")


def sql_literal(value) -> str:
    """A literal (as :meth:`Filter.literal_for` gives it) in SQL."""
    if isinstance(value, bool | np.bool_):
        return "TRUE" if value else "FALSE"
    if isinstance(value, np.datetime64):
        return f"CAST('{value}' AS DATE)"
    if isinstance(value, float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def parse_filter(text: str, *, label: str = "--where") -> Filter:
    """The filter an expression says (see the module docstring for the language). label: how
    messages name where the expression came from (``--where`` for the CLI, ``where`` for the
    API). UserError (one line, naming the token and its position) for a malformed one."""
    return Filter(text, _Parser(text, label).expression(), label)


# --- metadata.csv ---------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike, paths: list[str]) -> dict[str, np.ndarray]:
    """The columns of a metadata file, one value per gallery item: name -> (N,) array aligned
    to ``paths`` (N,), the gallery's paths relative to the data root (the file's folder).

    The file is UTF-8 CSV whose first line names the columns, one of them ``path``. Cells are
    stripped of surrounding spaces; an empty cell is missing. A column is a number column
    (float64, NaN missing) if every non-empty cell of the file is a number, a date column
    (datetime64[D], NaT missing) if every one is a ``YYYY-MM-DD`` date, a true/false column
    (objects: True, False, None) if every one is true or false (any case), else text (objects:
    str, None). Rows of paths not in the gallery are ignored; gallery items without a row get
    missing values. ``path`` holds the gallery's paths. UserError (one line naming the file and
    line) for a missing file, a header without ``path``, a row of the wrong length, or a path
    given twice.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: no such file; write a UTF-8 CSV whose first line names the columns, "
            "one of them path (the image's path relative to the data root)"
        )
    header, rows = _metadata_rows(path)
    root = path.parent.absolute()
    position = {relative_to_root(p.strip(), root): i for i, p in enumerate(paths)}
    at = np.full(len(rows), -1, dtype=np.int64)  # each row's gallery item, -1: none
    first_line: dict[str, int] = {}
    path_field = header.index(PATH_COLUMN)
    for i, (line, fields) in enumerate(rows):
        item = relative_to_root(fields[path_field].strip(), root)
        if item in first_line:
            raise UserError(
                f"{path}:{line}: a second row for {item!r} (the first is line "
                f"{first_line[item]}); give each image one row"
            )
        first_line[item] = line
        at[i] = position.get(item, -1)
    columns = {}
    for j, name in enumerate(header):
        if j == path_field:
            columns[name] = np.array(list(paths), dtype=object)
            continue
        cells = [fields[j] for _, fields in rows]
        kind = _cell_kind(cells)
        aligned = [""] * len(paths)
        for row, item in enumerate(at):
            if item >= 0:
                aligned[item] = cells[row]
        columns[name] = _column_of_cells(aligned, kind)
    return columns


def _metadata_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header's column names and the (line number, stripped fields) of each non-blank row."""
    header, rows = None, []
    for line, fields in enumerate(csv_rows(path), start=1):
        fields = [field.strip() for field in fields]
        if not any(fields):
            continue
        if header is None:
            header = _checked_header(path, line, fields)
            continue
        if len(fields) != len(header):
            raise UserError(
                f"{path}:{line}: {len(fields)} fields, the header has {len(header)} "
                f"({', '.join(header)}); quote fields that hold commas"
            )
        if not fields[header.index(PATH_COLUMN)]:
            raise UserError(f"{path}:{line}: the path is empty; give the image's path")
        rows.append((line, fields))
    if header is None:
        raise UserError(
            f"{path}: the file is empty; its first line names the columns, one of them path"
        )
    return header, rows


def _checked_header(path: Path, line: int, names: list[str]) -> list[str]:
    for i, name in enumerate(names):
        if not name:
            raise UserError(f"{path}:{line}: column {i + 1} of the header has no name")
        if name in names[:i]:
            raise UserError(f"{path}:{line}: two columns are named {name!r}")
    if PATH_COLUMN not in names:
        close = difflib.get_close_matches(PATH_COLUMN, names, n=1)
        hint = f" (is {close[0]!r} it? name it path)" if close else ""
        raise UserError(
            f"{path}:{line}: no 'path' column among {', '.join(names)}{hint}; the first line "
            "names the columns, one of them path"
        )
    return names


def _cell_kind(cells: list[str]) -> str:
    """number, date, boolean or text: the kind every non-empty cell has (see read_metadata)."""
    present = [cell for cell in cells if cell]
    if all(_NUMBER.fullmatch(cell) for cell in present):
        return "number" if present else "text"
    if all(_is_date(cell) for cell in present):
        return "date"
    if all(cell.lower() in ("true", "false") for cell in present):
        return "boolean"
    return "text"


def _is_date(cell: str) -> bool:
    if not _DATE.fullmatch(cell):
        return False
    try:
        np.datetime64(cell, "D")
    except ValueError:
        return False
    return True


def _column_of_cells(cells: list[str], kind: str) -> np.ndarray:
    """(N,) array of a column's cells ('' missing) of one kind (see read_metadata)."""
    if kind == "number":
        return np.array([float(cell) if cell else np.nan for cell in cells], dtype=np.float64)
    if kind == "date":
        return np.array([cell or "NaT" for cell in cells], dtype="datetime64[D]")
    if kind == "boolean":
        return np.array([cell.lower() == "true" if cell else None for cell in cells], dtype=object)
    return np.array([cell or None for cell in cells], dtype=object)


# --- filtered search ------------------------------------------------------------------------------


def filtered_topk(
    index: SearchIndex,
    queries: np.ndarray,
    k: int,
    mask: np.ndarray,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best gallery items of each query among those ``mask`` (N,) keeps, best first, as
    ``index.search`` ranks them: scores (Q, k) float32 and indices (Q, k) int64, padded with
    -inf and -1 where fewer are found. queries: (Q, D); exclude: as ``index.search`` takes it.

    An :class:`~retrieval.search.ExactIndex` whose mask keeps at most :data:`SUBSET_SHARE` of
    the gallery searches the matching items alone; any other search widens: it asks the index
    for k candidates, then 4k, 16k, ... up to the whole gallery, until k of a query's
    candidates match (or all its matching items, when fewer match). So an exact index never
    answers fewer than k when k match; an approximate one answers what its candidates hold
    (an IVF index's probed lists may hold fewer matching items).
    """
    n_gallery = len(index)
    mask = np.asarray(mask)
    if mask.shape != (n_gallery,) or mask.dtype != bool:
        raise ValueError(f"mask must be ({n_gallery},) bool; got {mask.shape} {mask.dtype}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    exclude = exclusion_mask(exclude, len(queries), n_gallery)
    matching = np.flatnonzero(mask)
    if len(matching) == 0 or len(queries) == 0:
        return _padded(len(queries), k)
    if isinstance(index, ExactIndex) and len(matching) <= SUBSET_SHARE * n_gallery:
        return _search_subset(index, queries, k, matching, exclude)
    return _search_widening(index, queries, k, mask, exclude)


def _padded(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.full((n_queries, k), -np.inf, dtype=np.float32),
        np.full((n_queries, k), -1, dtype=np.int64),
    )


def _search_subset(index: ExactIndex, queries, k, matching, exclude):
    """An exact index of the matching items alone (gallery order kept, so ties still go to
    the lower gallery index); exclusions and answers mapped between the two numberings."""
    subset = ExactIndex(index.embeddings[matching], index.normalized, memory_mb=index.memory_mb)
    place = np.full(len(index), -1, dtype=np.int64)
    place[matching] = np.arange(len(matching))
    excluded = np.where(exclude >= 0, place[np.maximum(exclude, 0)], -1)
    scores, found = subset.search(queries, k, excluded if excluded.size else None)
    return scores, np.where(found >= 0, matching[np.maximum(found, 0)], -1)


def _search_widening(index: SearchIndex, queries, k, mask, exclude):
    """Candidate passes of k, 4k, 16k, ... items for the queries still short of their target:
    k, or every matching item they do not exclude when fewer match."""
    n_gallery = len(index)
    scores, indices = _padded(len(queries), k)
    # Matching items each query excludes, counted once each.
    excluded = np.sort(exclude, axis=1)
    distinct = np.ones(excluded.shape, dtype=bool)
    distinct[:, 1:] = excluded[:, 1:] != excluded[:, :-1]
    excluded_matches = (distinct & (excluded >= 0) & mask[np.maximum(excluded, 0)]).sum(axis=1)
    target = np.minimum(k, np.count_nonzero(mask) - excluded_matches)
    pending, fetch = np.arange(len(queries)), k
    while len(pending):
        fetch = min(fetch, n_gallery)
        passed = exclude[pending] if exclude.shape[1] else None
        found_scores, found = index.search(queries[pending], fetch, passed)
        keep = (found >= 0) & mask[np.maximum(found, 0)]
        # The index had no more candidates (padding), or has given every item: no use widening.
        done = (keep.sum(axis=1) >= target[pending]) | (found < 0).any(axis=1)
        done |= fetch >= n_gallery
        rows = pending[done]
        # Kept candidates first, in the index's order (a stable sort of "not kept").
        first = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep[done], first, axis=1)
        width = first.shape[1]
        scores[rows, :width] = np.where(
            kept, np.take_along_axis(found_scores[done], first, axis=1), -np.inf
        )
        indices[rows, :width] = np.where(kept, np.take_along_axis(found[done], first, axis=1), -1)
        pending, fetch = pending[~done], fetch * WIDENING
    return scores, indices
