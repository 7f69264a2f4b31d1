"""Name -> builder registries (timm's ``create_model`` idea).

An entry is registered either by a decorator on its builder, or with the builder named as
``"module:attribute"`` text, imported on first use. The second form keeps a registry's names,
parameters and facts importable without the builder's heavy dependencies: the config is validated
against the loss and backbone registries without importing TensorFlow.

The registry's names are what error messages and the config reference list as allowed values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tfcbir import UserError
from tfcbir.params import Param, did_you_mean, fmt


@dataclass(frozen=True)
class Entry:
    name: str
    target: Callable | str  # the builder, or "module:attribute" naming it (imported on use)
    params: dict[str, Param] = field(default_factory=dict)  # the builder's own parameters
    doc: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # registry-specific facts

    @property
    def builder(self) -> Callable:
        """The builder itself; a named one is imported now (and once)."""
        return resolve(self.target)


def resolve(target: Callable | str) -> Any:
    """``target`` itself, or the object a ``"module:attribute"`` text names (imported)."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        target: str | None = None,
        *,
        params: dict[str, Param] | None = None,
        doc: str = "",
        **meta,
    ) -> Callable | None:
        """``@REG.register("small_cnn", min_size=8)`` on a builder, or
        ``REG.register("angular", "losses.angular:AngularLoss", doc=..., ...)`` naming one."""

        def decorate(builder: Callable | str) -> Callable | str:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            text = doc
            if not text and not isinstance(builder, str):
                text = (builder.__doc__ or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, builder, dict(params or {}), text, meta)
            return builder

        if target is not None:
            decorate(target)
            return None
        return decorate

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._entries

    def get(self, name: str, path: str = "") -> Entry:
        """The entry called ``name``; a UserError naming ``path`` and the allowed names if none
        (also when ``name`` is not a string, e.g. a list or mapping from a config file)."""
        if not isinstance(name, str) or name not in self._entries:
            where = f"{path}: " if path else ""
            raise UserError(
                f"{where}{fmt(name)} is not one of {', '.join(self._entries)}"
                + did_you_mean(name, self.names())
            )
        return self._entries[name]
