"""Declarative parameter specs, shared by the config schema, the loss and the backbone registries.

A spec is a dict ``{key: Param(...)}``. :func:`validate` checks a user dict against it, fills the
defaults and raises :class:`tfcbir.UserError` with the key path, the value and what is allowed:
``loss.margin: -1 is below the minimum 0``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tfcbir import UserError

REQUIRED = object()  # marker: the key has no default


@dataclass(frozen=True)
class Param:
    """One key of a spec.

    type: ``int``, ``float``, ``bool``, ``str``, ``list`` or ``dict`` (or a tuple of those; a float
        key accepts ints). ``None`` is allowed only with ``nullable``.
    item, length: for lists, the type of each item and the exact length (``None``: any).
    choices: the allowed values (for ``str``), listed in error messages.
    min, max: inclusive bounds unless ``min_exclusive``/``max_exclusive``.
    check: extra check returning an error text (without the key path) or ``None``.
    allowed_text: the allowed values in words (text, or a function giving it), for keys whose
        ``check`` accepts more than a list of choices.
    """

    type: type | tuple
    default: Any = REQUIRED
    doc: str = ""
    choices: Sequence | Callable[[], Sequence] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    item: type | None = None
    length: int | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None
    allowed_text: str | Callable[[], str] | None = None

    def allowed(self) -> list:
        choices = self.choices() if callable(self.choices) else self.choices
        return list(choices) if choices is not None else []

    def describe(self) -> str:
        """Allowed values in words, for error messages and the config reference (docs/config.md)."""
        if self.allowed_text is not None:
            return self.allowed_text() if callable(self.allowed_text) else self.allowed_text
        if self.allowed():
            return "one of " + ", ".join(str(c) for c in self.allowed())
        names = _type_names(self.type)
        if self.type is list:
            plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
            names = f"a list of {self.length or 'any number of'} {plural.get(self.item, 'values')}"
        parts = [names]
        if self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_exclusive else '<='} {self.max:g}")
        if self.nullable:
            parts.append("or null")
        return " ".join(parts)


def _type_names(t) -> str:
    types = t if isinstance(t, tuple) else (t,)
    names = {
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        object: "values",
    }
    return " or ".join(names.get(x, x.__name__) for x in types)


def _is_type(value, t) -> bool:
    types = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def fmt(value) -> str:
    """A value as the user wrote it: strings quoted, the rest as JSON-ish text."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_value(value, param: Param, path: str):
    """Check one value; return it normalised (ints become floats for float keys)."""
    if value is None:
        if param.nullable:
            return None
        raise UserError(f"{path}: null is not allowed; give {param.describe()}")
    if not _is_type(value, param.type):
        raise UserError(
            f"{path}: {fmt(value)} is not {_type_names(param.type)}; give {param.describe()}"
        )
    shown = value
    if param.type is float and isinstance(value, int):
        value = float(value)
    if isinstance(value, list):
        if param.length is not None and len(value) != param.length:
            raise UserError(f"{path}: {fmt(value)} has {len(value)} items; give {param.describe()}")
        if param.item is not None:
            for i, item in enumerate(value):
                if not _is_type(item, param.item):
                    raise UserError(
                        f"{path}[{i}]: {fmt(item)} is not {_type_names(param.item)}; "
                        f"give {param.describe()}"
                    )
    allowed = param.allowed()
    if allowed and value not in allowed:
        raise UserError(
            f"{path}: {fmt(value)} is not one of {', '.join(map(str, allowed))}"
            + did_you_mean(value, allowed)
        )
    numbers = value if isinstance(value, list) else [value]
    for i, number in enumerate(numbers):
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if not math.isfinite(number):  # JSON and YAML can write NaN and Infinity
            where = f"{path}[{i}]" if isinstance(value, list) else path
            raise UserError(
                f"{where}: {fmt(number)} is not a finite number; give {param.describe()}"
            )
        if param.min is not None and (
            number < param.min or (param.min_exclusive and number == param.min)
        ):
            word = "must be greater than" if param.min_exclusive else "is below the minimum"
            raise UserError(f"{path}: {fmt(shown)} {word} {param.min:g}")
        if param.max is not None and (
            number > param.max or (param.max_exclusive and number == param.max)
        ):
            word = "must be less than" if param.max_exclusive else "is above the maximum"
            raise UserError(f"{path}: {fmt(shown)} {word} {param.max:g}")
    if param.check is not None:
        problem = param.check(value)
        if problem:
            raise UserError(f"{path}: {fmt(value)} {problem}")
    return value


def did_you_mean(value, allowed) -> str:
    """`` (did you mean 'x'?)`` naming the allowed value closest to ``value``, or "" when none is
    close (or ``value`` is not text): the tail of an error message about an unknown name."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(values: dict | None, spec: dict[str, Param], path: str) -> dict:
    """Check ``values`` against ``spec``; return a new dict with every key, defaults filled.

    Unknown keys, missing required keys, wrong types and out-of-range values raise UserError
    naming ``path.key``.
    """
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"{path}: {fmt(values)} is not a mapping; give keys " + ", ".join(spec))
    unknown = [k for k in values if k not in spec]
    if unknown:
        key = unknown[0]
        raise UserError(
            f"{_join(path, key)}: unknown key; allowed keys are {', '.join(spec)}"
            + did_you_mean(key, list(spec))
        )
    out = {}
    for key, param in spec.items():
        if key in values:
            out[key] = check_value(values[key], param, _join(path, key))
        elif param.default is REQUIRED:
            raise UserError(f"{_join(path, key)}: missing; give {param.describe()}")
        else:
            out[key] = _copy(param.default)
    return out


def defaults(spec: dict[str, Param]) -> dict:
    """The spec's defaults (keys without one are left out)."""
    return {k: _copy(p.default) for k, p in spec.items() if p.default is not REQUIRED}


def _copy(value):
    return (
        list(value)
        if isinstance(value, list)
        else dict(value)
        if isinstance(value, dict)
        else value
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
