"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with a damped inverse Hessian and lazy block updates.

Unstructured: each block of columns prunes its share of the layer's target by the saliency w²/[H⁻¹]_jj of the
current (already updated) weights, so the layer ends at exactly round(sparsity · numel) pruned weights. N:M:
N of every M columns kept, chosen when the solver reaches the group. Weights pruned earlier stay zero and pruned.

On a layer quantized earlier, every updated weight is rounded onto a grid with its rounding error fed forward, so
the result lies exactly on a grid of the promised kind; `grid` says which one:
  * keep (default): the earlier grid as it is, ranges included, so a compensating update that leaves a group's
    range is clamped to it;
  * refit: a grid of the same kind (format, bits, group size, symmetry; min-max, or max-scaled for a float
    format) fit anew to the weights the pruning alone writes, found by a first solve without rounding; the second
    solve rounds onto it. The recorded grid is the new one.
On a layer without an earlier grid the setting changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import Tensor

from compress_order.core.errors import UserError
from compress_order.modeling.hessian import HessianStats
from compress_order.modeling.targets import Target
from compress_order.numerics.constraints import required_zeros
from compress_order.numerics.formats import FloatGrid, refit_like
from compress_order.numerics.obs import ColumnGrid, obs_solve
from compress_order.numerics.quant import QuantGrid
from compress_order.stages.base import PruneMixin, Stage, set_pruned


def check_solver_params(name: str, blocksize: int, percdamp: float) -> None:
    if not isinstance(blocksize, int) or blocksize < 1:
        raise UserError(f"{name} blocksize={blocksize} must be a positive integer (e.g. 128)")
    if not 0 <= float(percdamp) < 1:
        raise UserError(f"{name} percdamp={percdamp} is outside [0, 1) (e.g. 0.01)")


def grid_for_updates(
    earlier: QuantGrid | FloatGrid | None, mode: str, unrounded: Callable[[], Tensor]
) -> QuantGrid | FloatGrid | None:
    """The grid a weight-updating pruner rounds its updates onto: None on a layer never quantized; `keep`: the
    earlier grid itself; `refit`: one of its kind fit to `unrounded()`, the weights the pruning writes without
    rounding (zeros where pruned), so each group's range holds the compensating updates that land in it."""
    if earlier is None or mode == "keep":
        return earlier
    return refit_like(earlier, unrounded())


class SparseGPT(PruneMixin, Stage):
    kind = "prune"
    needs = "hessian"

    def __init__(
        self,
        sparsity: float,
        nm: str | None = None,  # e.g. "2:4" keeps 2 of every 4 consecutive inputs
        blocksize: int = 128,  # columns per lazy update block (and per adaptive mask choice)
        percdamp: float = 0.01,  # damping: this fraction of mean(diag H) added to the diagonal
        grid: Literal["keep", "refit"] = "keep",  # after a quantizer: keep its grid (ranges too), or refit one
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_sparsity(sparsity, nm)
        check_solver_params("sparsegpt", blocksize, percdamp)
        self.blocksize, self.percdamp = int(blocksize), float(percdamp)
        self.grid = grid

    @classmethod
    def identity(cls, params: Mapping[str, Any], earlier_kinds: tuple[str, ...]) -> dict[str, Any]:
        """Without an earlier quantizer there is no grid to keep or refit: `grid` changes nothing, so the node is
        the same whatever it says (one node, one key)."""
        if any(kind in ("quantize", "joint") for kind in earlier_kinds):
            return dict(params)
        return {k: v for k, v in params.items() if k != "grid"}

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_nm(targets)

    def compress(self, target: Target, stats: HessianStats) -> None:
        c = target.constraint
        w = target.weight
        U = stats.inverse_cholesky(self.percdamp, w.device)
        n_prune = 0 if self.nm is not None else required_zeros(self.sparsity, w.numel())

        def solve(rounding: ColumnGrid | None) -> tuple[Tensor, Tensor]:
            return obs_solve(w, U, c.mask, n_prune, self.nm, rounding, self.blocksize)

        grid = grid_for_updates(c.grid, self.grid, lambda: solve(None)[0])
        new, keep = solve(None if grid is None else ColumnGrid(grid))
        set_pruned(target, new, keep, self.sparsity, self.nm, self.label)
        c.grid = grid  # the earlier grid (keep) or its refit: the invariants check the weights against it
