"""Named things of one kind (stages, tasks, backends, metrics, commands), each in one table: what `compress-order
list` prints and what an error message offers as the valid choices read the same entries."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from compress_order.errors import UserError, choices

T = TypeVar("T")


class Registry(dict[str, T]):
    """Name → entry, grown through `register`: a name registered twice must be the same entry (rows already
    written under a name must not change meaning)."""

    def __init__(self, what: str, also: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.what = what  # "backend", "metric", ...: the noun of error messages
        self.also = also  # further valid words beside the entries (e.g. "auto", "none")

    def register(self, name: str, entry: T) -> T:
        known = self.setdefault(name, entry)
        if known != entry:
            raise ValueError(f"{self.what} '{name}' is already registered as {known}; cannot redefine it as {entry}")
        return known

    def registers(self, name: str) -> Callable[[T], T]:
        """A decorator registering what it decorates under `name`."""
        return lambda entry: self.register(name, entry)

    def lookup(self, name: str) -> T:
        """The entry, else one line naming the valid ones."""
        if name not in self:
            raise self.unknown(name)
        return self[name]

    def unknown(self, name: str) -> UserError:
        valid = choices(self) + "".join(f", {a}" for a in self.also)
        return UserError(f"unknown {self.what} '{name}'; valid: {valid}")
