"""Magnitude pruning: drop the weights of smallest |w| (per layer, per row, or N:M)."""

from __future__ import annotations

from typing import Any, Literal

from compress_order.modeling.targets import Target
from compress_order.numerics.prune import select_mask
from compress_order.stages.base import PruneMixin, Stage, set_pruned


class Magnitude(PruneMixin, Stage):
    kind = "prune"

    def __init__(
        self,
        sparsity: float,
        nm: str | None = None,  # e.g. "2:4" keeps 2 of every 4 consecutive inputs
        scope: Literal["row", "layer"] = "layer",  # rank the whole matrix, or each output row
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_sparsity(sparsity, nm)
        self.scope = scope

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_nm(targets)

    def compress(self, target: Target, stats: Any = None) -> None:
        w = target.weight
        mask = select_mask(w.abs(), self.sparsity, self.nm, target.constraint.mask, self.scope)
        set_pruned(target, w, mask, self.sparsity, self.nm, self.label)
