"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with a damped inverse Hessian and lazy block updates.

Unstructured: each block of columns prunes its share of the layer's target by the saliency w²/[H⁻¹]_jj of the
current (already updated) weights, so the layer ends at exactly round(sparsity · numel) pruned weights. N:M:
N of every M columns kept, chosen when the solver reaches the group. On a layer quantized earlier, every
updated weight is re-rounded onto the existing grid with its rounding error fed forward, so the result stays
exactly on that grid; weights pruned earlier stay zero and pruned.
"""

from __future__ import annotations

from typing import Any

from compress_order.core.errors import UserError
from compress_order.modeling.hessian import HessianStats, damped_inverse_cholesky
from compress_order.modeling.targets import Target
from compress_order.numerics.constraints import required_zeros
from compress_order.numerics.obs import ColumnGrid, obs_solve
from compress_order.stages.base import PruneMixin, Stage, set_pruned


def check_solver_params(name: str, blocksize: int, percdamp: float) -> None:
    if not isinstance(blocksize, int) or blocksize < 1:
        raise UserError(f"{name} blocksize={blocksize} must be a positive integer (e.g. 128)")
    if not 0 <= float(percdamp) < 1:
        raise UserError(f"{name} percdamp={percdamp} is outside [0, 1) (e.g. 0.01)")


class SparseGPT(PruneMixin, Stage):
    kind = "prune"
    needs = "hessian"

    def __init__(
        self,
        sparsity: float,
        nm: str | None = None,  # e.g. "2:4" keeps 2 of every 4 consecutive inputs
        blocksize: int = 128,  # columns per lazy update block (and per adaptive mask choice)
        percdamp: float = 0.01,  # damping: this fraction of mean(diag H) added to the diagonal
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_sparsity(sparsity, nm)
        check_solver_params("sparsegpt", blocksize, percdamp)
        self.blocksize, self.percdamp = int(blocksize), float(percdamp)

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_nm(targets)

    def compress(self, target: Target, stats: HessianStats) -> None:
        c = target.constraint
        w = target.weight
        U = damped_inverse_cholesky(stats.H.to(w.device), self.percdamp)
        n_prune = 0 if self.nm is not None else required_zeros(self.sparsity, w.numel())
        rounding = ColumnGrid(c.grid) if c.grid is not None else None  # keep an earlier grid exactly
        new, keep = obs_solve(w, U, c.mask, n_prune, self.nm, rounding, self.blocksize)
        set_pruned(target, new, keep, self.sparsity, self.nm, self.label)
