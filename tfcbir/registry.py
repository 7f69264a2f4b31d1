"""Name -> builder registries, filled by a decorator on each builder (timm's ``create_model`` idea).

The registry's names are what error messages and the config reference list as allowed values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tfcbir import UserError
from tfcbir.params import Param, _did_you_mean, fmt


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable
    params: dict[str, Param] = field(default_factory=dict)  # the builder's own parameters
    doc: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # registry-specific facts


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, params: dict[str, Param] | None = None, doc: str = "", **meta
    ) -> Callable:
        """Decorator: ``@BACKBONES.register("resnet_v1_50", preprocess="caffe")``."""

        def decorate(builder: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            text = doc or (builder.__doc__ or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, builder, dict(params or {}), text, meta)
            return builder

        return decorate

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def get(self, name: str, path: str = "") -> Entry:
        """The entry called ``name``; a UserError naming ``path`` and the allowed names if none."""
        if name not in self._entries:
            where = f"{path}: " if path else ""
            raise UserError(
                f"{where}{fmt(name)} is not one of {', '.join(self._entries)}"
                + _did_you_mean(name, self.names())
            )
        return self._entries[name]
