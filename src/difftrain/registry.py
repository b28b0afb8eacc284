"""Explicit name -> object tables. Configs name things; only these dicts turn names into code."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from difftrain.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table, e.g. `MODELS = Registry("model")`; `MODELS["adm_unet"]` or a clear error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown {self.kind} '{name}'{hint}; choose from {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)
