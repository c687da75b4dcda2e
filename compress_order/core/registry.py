"""Named things of one kind (stages, tasks, backends, metrics, commands, config groups), each in one table: what
`compress-order list` prints and what an error message offers as the valid choices read the same entries.

Tables of config files are filled from their folder (conf/<group>/), the one source of their names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import yaml

from compress_order.core.errors import UserError, choices
from compress_order.core.paths import CONF_DIR, group_options

T = TypeVar("T")


class Registry(dict[str, T]):
    """Name → entry, grown through `register`: a name registered twice must be the same entry (rows already
    written under a name must not change meaning)."""

    def __init__(self, what: str, also: tuple[str, ...] = (), valid: str = "valid") -> None:
        super().__init__()
        self.what = what  # "backend", "metric", ...: the noun of error messages
        self.also = also  # further valid words beside the entries (e.g. "auto", "none")
        self.valid = valid  # the words before the list of valid names ("valid stages")

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
        return UserError(f"unknown {self.what} '{name}'; {self.valid}: {valid}")


@lru_cache(maxsize=None)
def config_group(group: str) -> Registry[Path]:
    """A Hydra config group (model, data, experiment, ...): name → its yaml, conf/<group>/<name>.yaml."""
    table: Registry[Path] = Registry(group)
    for name in group_options(group):
        table.register(name, CONF_DIR / group / f"{name}.yaml")
    return table


@dataclass(frozen=True)
class StageFile:
    """A stage's yaml (the class it names, what it binds to the root config) and that class's import path."""

    path: Path
    target: str  # the yaml's `_target_`: the class declaring the stage's parameters and defaults
    label: str | None  # the label the yaml sets (`sparsegpt+gptq`), if any


@lru_cache(maxsize=None)
def stage_files() -> Registry[StageFile]:
    """The stages `stages=[...]` and `joint=[...]` may name: the files of conf/stage/."""
    table: Registry[StageFile] = Registry("stage", valid="valid stages")
    for name, path in config_group("stage").items():
        node = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        label = node.get("label")
        table.register(name, StageFile(path, str(node["_target_"]), None if label is None else str(label)))
    return table
