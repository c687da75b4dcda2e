"""Dataset loaders named by `_target_` in conf/data/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress_order.errors import UserError


@dataclass
class TextSplits:
    """Raw text: `train` feeds calibration, `valid` is evaluated."""

    name: str
    train: str
    valid: str


def _read(path: str, what: str, name: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data '{name}': {what} file '{path}' does not exist; set data.{what}=/path/to/text")
    return p.read_text(encoding="utf-8")


def text_files(name: str, train: str, valid: str) -> TextSplits:
    """Plain UTF-8 text files (the embedded Shakespeare corpus, or any local corpus)."""
    return TextSplits(name=name, train=_read(train, "train", name), valid=_read(valid, "valid", name))
