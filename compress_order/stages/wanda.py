"""Wanda (Sun et al., 2023): prune by |W_ij| · ‖X_j‖₂, ranked within each output row (or layer, or N:M group).

No weight is updated, so a grid recorded earlier still holds (0 is always a grid point), and weights pruned
earlier rank lowest (prior mask), so the mask only grows.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from compress_order.modeling.hessian import HessianStats
from compress_order.modeling.targets import Target
from compress_order.numerics.prune import select_mask
from compress_order.stages.base import PruneMixin, Stage, set_pruned


class Wanda(PruneMixin, Stage):
    kind = "prune"
    needs = "hessian_diag"  # only ‖X_j‖² is read: the driver keeps the diagonal, not the full H

    def __init__(
        self,
        sparsity: float,
        nm: str | None = None,  # e.g. "2:4" keeps 2 of every 4 consecutive inputs
        scope: Literal["row", "layer"] = "row",  # the paper ranks within each output row
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_sparsity(sparsity, nm)
        self.scope = scope

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_nm(targets)

    def compress(self, target: Target, stats: HessianStats | None = None) -> None:
        w = target.weight
        prior = target.constraint.mask
        if stats is None or stats.n == 0:  # a layer calibration never reached: plain magnitude
            norm = torch.ones(w.shape[1], device=w.device)
        else:
            # ∝ ‖X_j‖₂: the constant factor 2/n does not change any ranking
            norm = stats.diag().to(w.device).clamp_min(0).sqrt()
        score = w.float().abs() * norm[None, :]
        # Row scope is the paper's comparison group (select_mask keeps the layer total exact).
        mask = select_mask(score, self.sparsity, self.nm, prior, self.scope)
        set_pruned(target, w, mask, self.sparsity, self.nm, self.label)
