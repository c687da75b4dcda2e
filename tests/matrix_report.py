"""What the family matrix tests covered, for docs/families.md's coverage table (`python scripts/family_table.py`).

A matrix test calls `record(...)` once its checks have passed. With the environment variable `MATRIX_ENV` naming a
file, each record is appended to it as one JSON line; without it nothing is written, so the normal suite is
unaffected. The layer kinds are read from the modules themselves, not from compress_order.modeling.targets.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from torch import nn

MATRIX_ENV = "COMPRESS_ORDER_MATRIX"


def layer_kind(module: nn.Module) -> str:
    """A compressed layer's type as the table names it: the class, and for a Conv2d its kernel and grouping."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Conv2d):
        k = "×".join(map(str, module.kernel_size))
        if module.groups == 1:
            return f"Conv2d {k}"
        return f"{'depthwise' if module.groups == module.in_channels else 'grouped'} Conv2d {k}"
    if isinstance(module, Conv1D):
        return "Conv1D (transposed)"
    return type(module).__name__


def kinds(modules: Iterable[nn.Module]) -> dict[str, int]:
    return dict(sorted(Counter(layer_kind(m) for m in modules).items()))


def record(kind: str, family: str, model: str, layers: dict[str, int], dense: list[str], blocks: str,
           orders: list[str]) -> None:  # fmt: skip
    """One passed matrix case: `kind` decoder|vision, the family and how it was built, compressed layer kinds
    with counts, the layers left dense, the calibration blocks found, and the orders run."""
    path = os.environ.get(MATRIX_ENV)
    if not path:
        return
    row = {"kind": kind, "family": family, "model": model, "layers": layers, "dense": dense, "blocks": blocks,
           "orders": orders}  # fmt: skip
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
