"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with per-channel factors.

For layers fed one input X, s_j = max|X_j|^α / max_i |W_ij|^(1-α) (the maximum over every layer of the group),
X is divided by s (folded into the producer of X: a norm or a linear layer, scaling.Partner) and each W's column
j multiplied by s_j. The model's function is unchanged; activations get flatter, so `act_bits` rounding (W8A8)
costs less, while weights get harder to quantize as α grows.

A transform: no weight is rounded or pruned. After a pruner the mask holds (zeros stay zero). After a quantizer
the factors are averaged per quantization group so the grid rescales exactly; a per-channel grid cannot absorb
any input factor, which makes that order infeasible (reported, not run).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from compress_order.core.errors import UserError
from compress_order.modeling.hessian import HessianStats
from compress_order.modeling.scaling import (
    Partner,
    float_grid_obstacle,
    grid_obstacle,
    group_constant,
    multiply_columns,
)
from compress_order.modeling.targets import Target
from compress_order.stages.base import Stage

log = logging.getLogger(__name__)


class SmoothQuant(Stage):
    kind = "transform"
    needs = "hessian_diag"  # reads only the per-channel max |X_j| the statistics keep alongside
    scales_inputs = True

    def __init__(self, alpha: float = 0.5, **kw: Any):  # α 0: no migration ... 1: activations fully into weights
        super().__init__(**kw)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= float(alpha) <= 1:
            raise UserError(f"smoothquant alpha={alpha} is outside [0, 1]")
        self.alpha = float(alpha)

    def feasible(self, targets: dict[str, Target]) -> str | None:
        why = float_grid_obstacle(targets)
        if why is not None:
            return f"{self.label} after a quantizer: {why}"
        linear = [t for t in targets.values() if t.adapter.linear and t.constraint.grid is not None]
        for t in linear:
            why = grid_obstacle([t])
            if why is not None:
                return f"{self.label} after a quantizer: {why}"
        return None

    def factors(self, group: list[Target], stats: HessianStats) -> torch.Tensor:
        dev = group[0].device
        xmax = stats.absmax.to(dev)
        wmax = torch.stack([t.weight.float().abs().amax(0) for t in group]).amax(0)
        s = xmax.clamp_min(1e-5).pow(self.alpha) / wmax.clamp_min(1e-5).pow(1 - self.alpha)
        # a channel never active or fully pruned carries nothing to migrate: leave it as it is
        return torch.where((xmax > 0) & (wmax > 0), s, torch.ones_like(s))

    def compress_group(self, group: list[Target], stats: HessianStats, partner: Partner | None = None) -> None:
        if partner is not None and stats.n > 0:
            s = self.factors(group, stats)
            grids = [t.constraint.grid for t in group if t.constraint.grid is not None]
            why = grid_obstacle(group)
            if why is not None:  # mixed group sizes in one group: those layers stay as they are
                log.warning("%s: %s; not smoothing this group", self.label, why)
            else:
                if grids:  # keep an earlier grid: factors constant within its groups
                    s = group_constant(s, grids[0].group_size)
                partner.divide(s)
                for t in group:
                    multiply_columns(t, s)
        for t in group:
            t.constraint.applied.append(self.label)
