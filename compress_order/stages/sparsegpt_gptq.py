"""SparseGPT's joint mode: prune and quantize in one OBS pass (Frantar & Alistarh, 2023, §joint quantization).

Each lazy block first chooses its pruned weights (as SparseGPT), then every column is rounded onto the grid and
both the pruning and the rounding error are fed to the columns still to come. The layer ends with a mask (at
exactly the target sparsity) and a grid that every weight lies on; an earlier mask is kept.

It takes no `grid` setting (SparseGPT's keep | refit of an earlier quantizer's grid): its pruning updates are rounded
onto the grid it fits itself, each group's range from the kept, updated weights when the solver reaches the group,
kept from then on; an earlier grid is replaced by it. `grid=` on this stage is refused as an unknown parameter.
"""

from __future__ import annotations

from typing import Any

from compress_order.modeling.hessian import HessianStats
from compress_order.modeling.targets import Target
from compress_order.numerics.constraints import required_zeros
from compress_order.numerics.obs import obs_solve
from compress_order.stages.base import PruneMixin, QuantMixin, Stage, set_pruned, set_quantized
from compress_order.stages.gptq import column_grid
from compress_order.stages.sparsegpt import check_solver_params


class SparseGPTGPTQ(PruneMixin, QuantMixin, Stage):
    kind = "joint"
    needs = "hessian"

    def __init__(
        self,
        sparsity: float,
        bits: int,
        nm: str | None = None,
        group_size: int = -1,
        sym: bool = False,
        percdamp: float = 0.01,
        blocksize: int = 128,
        format: str = "int",  # int | fp8 | nvfp4 | mxfp4
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_sparsity(sparsity, nm)
        self._init_quant(bits, group_size, sym, format)
        check_solver_params("sparsegpt_gptq", blocksize, percdamp)
        self.percdamp, self.blocksize = float(percdamp), int(blocksize)

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_nm(targets)
        self._validate_groups(targets)

    def compress(self, target: Target, stats: HessianStats) -> None:
        c = target.constraint
        w = target.weight.float()
        U = stats.inverse_cholesky(self.percdamp, w.device)
        # Per-channel: one range per row from the current weights; groups: fit as the solver reaches them,
        # after the block's pruning choice, from the kept and updated weights.
        rounding = column_grid(w, self.bits, self.group_size, self.sym, static=False, fmt=self.format)
        n_prune = 0 if self.nm is not None else required_zeros(self.sparsity, w.numel())
        new, keep = obs_solve(w, U, c.mask, n_prune, self.nm, rounding, self.blocksize)
        set_pruned(target, new, keep, self.sparsity, self.nm, self.label)
        set_quantized(target, new, rounding.grid, self.label, record=False)  # one application, one label
