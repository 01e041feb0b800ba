"""One shape for every family of named methods (align losses, judges, score methods, merge methods, stages).

A family is a `Registry`: entries registered by name, looked up by name; an unknown name is one RealignError line
that lists the names there are. Adding a method is one `register` call next to its definition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from realign.errors import RealignError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one family, in registration order."""

    def __init__(self, family: str):
        self.family = family  # what an entry is, for the error line: "align method", "judge", ...
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    @contextlib.contextmanager
    def temporarily(self, name: str, entry: T) -> Iterator[T]:
        """`entry` registered as `name` for the body only (a test's own method or stage)."""
        self.register(name, entry)
        try:
            yield entry
        finally:
            del self._entries[name]

    def get(self, name: str) -> T:
        """The entry named `name`; else one line: unknown <family> 'name' — use one of: ..."""
        if name not in self._entries:
            raise RealignError(f"unknown {self.family} {name!r}", f"use one of: {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()
