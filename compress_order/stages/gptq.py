"""GPTQ (Frantar et al., 2022): quantize column by column, feeding each rounding error to the columns not yet
quantized through the damped inverse Hessian, with lazy block updates.

Grids: per channel (group_size=-1) fit once from the weights; per group either fit when the solver reaches
the group's first column, from the updated weights (default), or all fit up front (static_groups=true).
act_order processes columns by decreasing H_jj; the grid still indexes groups in the original column order,
so with groups it needs static groups. On a pruned layer the mask is kept: pruned weights stay exactly zero
and take no part in error feedback, so unstructured and N:M patterns survive.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from compress_order.core.errors import UserError
from compress_order.modeling.hessian import HessianStats, damped_inverse_cholesky
from compress_order.modeling.targets import Target
from compress_order.numerics.formats import fit_weight_grid, lazy_grid
from compress_order.numerics.obs import ColumnGrid, obs_solve
from compress_order.stages.base import QuantMixin, Stage, set_quantized
from compress_order.stages.sparsegpt import check_solver_params


def column_grid(w: Tensor, bits: int, group_size: int, sym: bool, static: bool, fmt: str = "int") -> ColumnGrid:
    """Per-channel and static grids are fit now from `w`; otherwise an empty grid the solver fills per group
    (a float format's per-tensor scale is fixed now, from `w`)."""
    if group_size <= 0 or static:
        return ColumnGrid(fit_weight_grid(w, fmt, bits, group_size, sym), fit=False)
    return ColumnGrid(lazy_grid(w, fmt, bits, group_size, sym), fit=True)


class GPTQ(QuantMixin, Stage):
    kind = "quantize"
    needs = "hessian"

    def __init__(
        self,
        bits: int,
        group_size: int = -1,
        sym: bool = False,
        act_order: bool = False,  # columns by decreasing H_jj; with group_size > 0 needs static_groups=true
        static_groups: bool = False,  # fit every group's grid before the solve (else when the solver reaches it)
        percdamp: float = 0.01,
        blocksize: int = 128,
        format: str = "int",  # int | fp8 | nvfp4 | mxfp4: each column rounded onto that codebook, error fed forward
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_quant(bits, group_size, sym, format)
        check_solver_params("gptq", blocksize, percdamp)
        if act_order and self.group_size > 0 and not static_groups:
            raise UserError(
                f"gptq act_order=true with group_size={self.group_size} needs static_groups=true "
                f"(groups fit before reordering), or set act_order=false or group_size=-1"
            )
        self.act_order, self.static_groups = bool(act_order), bool(static_groups)
        self.percdamp, self.blocksize = float(percdamp), int(blocksize)

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_groups(targets)

    def compress(self, target: Target, stats: HessianStats) -> None:
        c = target.constraint
        w = target.weight.float()
        prior = c.mask
        rounding = column_grid(w, self.bits, self.group_size, self.sym, self.static_groups, self.format)
        perm = None
        if self.act_order:
            # Most-active inputs first: their errors can still be absorbed by the most other columns.
            H = stats.H.to(w.device)
            perm = torch.argsort(H.diagonal(), descending=True, stable=True)
            w, H = w[:, perm], H[perm][:, perm]
            prior = None if prior is None else prior[:, perm]
            rounding.col_ids = perm.tolist()
            U = damped_inverse_cholesky(H, self.percdamp)
        else:
            U = stats.inverse_cholesky(self.percdamp, w.device)
        q, _ = obs_solve(w, U, prior, 0, None, rounding, self.blocksize)
        if perm is not None:
            q = q[:, torch.argsort(perm)]
        set_quantized(target, q, rounding.grid, self.label)
