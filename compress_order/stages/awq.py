"""AWQ (Lin et al., 2024): activation-aware weight quantization by per-input-channel scaling.

For layers fed one input X (q/k/v; gate/up; V → O; up → down), inputs with large mean |X_j| matter most, so
their weight columns are scaled up before rounding: W' = Q(W·diag(s)), with X divided by s in the producer of X
(scaling.Partner). s = mean|X_j|^α normalised by sqrt(max s · min s), α from a grid on [0, 1) minimising the
group's output error Σ_layers ‖X (Q(W s)/s − W)ᵀ‖² = (n/2) tr(ΔW H ΔWᵀ), read from the calibration Hessian.
α = 0 is plain round-to-nearest, so the search never does worse than RTN on that measure. Optionally (`clip`)
each (row, group) range is then shrunk by the factor in [min_clip, 1] that minimises that group's own error.

A quantizer: the grid (per group, symmetric or with zero-points, 2-8 bits) is fit on the scaled weights, pruned
weights stay exactly zero (0 is a grid point), and a producer that is itself quantized has its grid rescaled per
row exactly. A group without a producer (none found) is quantized with s = 1.

`format` (fp8 | nvfp4 | mxfp4, formats.py): the search measures the error of rounding onto that format's grid,
the clip shrinks each group's max before its scale is stored in the format (NVFP4's per-tensor scale kept from
the unclipped weight), and the final grid is the format's. A producer already holding an NVFP4 or MX grid (V
before O, up before down, rounded earlier in the same pass) can absorb 1/s only as a power of two per row, which
shifts an E8M0 or E4M3 scale exactly (NVFP4's per-tensor scale shifted to keep them under 448): its group's s is
then searched among powers of two, and left at 1 when a shifted scale would fall below E4M3's range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from compress_order.core.errors import UserError
from compress_order.core.schemes import FLOAT_FORMATS
from compress_order.modeling.hessian import HessianStats
from compress_order.modeling.scaling import Partner, float_grid_obstacle
from compress_order.modeling.targets import Target
from compress_order.numerics.formats import FloatGrid, group_scales, rebalance_tensor_scale
from compress_order.numerics.quant import QuantGrid, grid_params
from compress_order.stages.base import QuantMixin, Stage, set_quantized


def output_error(dw: Tensor, H: Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the summed squared output error of a weight change over the calibration inputs (∝)."""
    return float(((dw @ H) * dw).sum())


def clipped_grid(
    w: Tensor,
    H: Tensor,
    mask: Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    ratios: list[float],
    fmt: str = "int",
) -> QuantGrid | FloatGrid:
    """Per (row, group) the range shrink in `ratios` whose rounding error Δ_g H_gg Δ_gᵀ is smallest."""
    rows, cols = w.shape
    gs = cols if group_size <= 0 else group_size
    ng = cols // gs
    wg = w.reshape(rows, ng, gs)
    idx = torch.arange(ng, device=w.device)
    Hg = H.reshape(ng, gs, ng, gs)[idx, :, idx, :]  # the diagonal blocks H_gg: (ng, gs, gs)
    best_err = torch.full((rows, ng), float("inf"), device=w.device)
    scale = torch.empty(rows, ng, device=w.device)
    zero = torch.empty(rows, ng, device=w.device)
    tensor_amax = w.abs().amax()  # a float format's per-tensor scale: one for every candidate, from the whole weight
    ts = None
    for r in ratios:
        if fmt == "int":
            sc, z = grid_params(wg.amin(-1) * r, wg.amax(-1) * r, bits, sym)
            grid = QuantGrid(bits, gs, sym, sc, z)
        else:
            sc, ts = group_scales(wg.abs().amax(-1) * r, FLOAT_FORMATS[fmt], tensor_amax)
            z = torch.zeros_like(sc)
            grid = FloatGrid(fmt, gs, sc, ts)
        q = grid.project(w)
        if mask is not None:
            q = q * mask
        d = (q - w).reshape(rows, ng, gs)
        err = torch.einsum("rgi,gij,rgj->rg", d, Hg, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale, zero = torch.where(better, sc, scale), torch.where(better, z, zero)
    return QuantGrid(bits, gs, sym, scale, zero) if fmt == "int" else FloatGrid(fmt, gs, scale, ts)


class AWQ(QuantMixin, Stage):
    kind = "quantize"
    needs = "hessian"
    scales_inputs = True

    def __init__(
        self,
        bits: int,
        group_size: int = 128,
        sym: bool = False,
        n_grid: int = 20,  # α values searched in [0, 1) for s = mean|X|^α
        clip: bool = True,  # then shrink each group's range by the factor in [min_clip, 1] with the least output error
        min_clip: float = 0.5,
        format: str = "int",  # int | fp8 | nvfp4 | mxfp4: the grid the search rounds onto and the result is on
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_quant(bits, group_size, sym, format)
        if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
            raise UserError(f"awq n_grid={n_grid} must be a whole number >= 1")
        if not 0 < float(min_clip) <= 1:
            raise UserError(f"awq min_clip={min_clip} is outside (0, 1]")
        self.n_grid, self.clip, self.min_clip = int(n_grid), bool(clip), float(min_clip)

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_groups(targets)

    def _rounded(self, w: Tensor, mask: Tensor | None) -> Tensor:
        q = self._fit(w).project(w)
        return q if mask is None else q * mask

    def feasible(self, targets: dict[str, Target]) -> str | None:
        why = float_grid_obstacle(targets)
        return None if why is None else f"{self.label} after a quantizer: {why}"

    def search(self, group: list[Target], stats: HessianStats, pow2: bool = False) -> Tensor:
        """The α-grid search of s = mean|X|^α (normalised) on the group's output error; `pow2`: each factor
        rounded to a power of two (what a producer's E8M0 or E4M3 scales absorb exactly)."""
        dev = group[0].device
        H = stats.H.to(dev)
        xmean = stats.absmean().to(dev).clamp_min(1e-8)
        ws = [(t.weight.float(), t.constraint.mask) for t in group]
        best, best_s = float("inf"), torch.ones_like(xmean)
        for k in range(self.n_grid):
            alpha = k / self.n_grid
            s = xmean.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            if pow2:
                s = torch.exp2(torch.round(torch.log2(s)))
            err = sum(output_error(self._rounded(w * s, m) / s - w, H) for w, m in ws)
            if err < best:
                best, best_s = err, s
        return best_s

    def compress_group(self, group: list[Target], stats: HessianStats, partner: Partner | None = None) -> None:
        s = None
        seen = stats is not None and stats.n > 0
        if partner is not None and seen:
            pow2 = _stored_scales(partner)
            s = self.search(group, stats, pow2)
            if pow2 and not _absorbs(partner, s):
                s = None  # a shifted E4M3 scale would leave its range: this group unscaled
            else:
                partner.divide(s)
        H = stats.H if seen else None
        for t in group:
            w = t.weight.float()
            mask = t.constraint.mask
            Hs = None
            if s is not None:
                w = w * s[None, :]
                if H is not None:  # error of the scaled weight on the scaled input X/s
                    Hs = H.to(w.device) / s[:, None] / s[None, :]
            elif H is not None:
                Hs = H.to(w.device)
            if self.clip and Hs is not None:
                ratios = torch.linspace(1.0, self.min_clip, 20).tolist() if self.min_clip < 1 else [1.0]
                grid = clipped_grid(w, Hs, mask, self.bits, self.group_size, self.sym, ratios, self.format)
            else:
                grid = self._fit(w)
            set_quantized(t, grid.project(w).to(t.dtype), grid, self.label)

    def compress(self, target: Target, stats: HessianStats | None = None) -> None:
        self.compress_group([target], stats, None)


def _stored_scales(partner: Partner) -> bool:
    """Whether the producer holds a float grid whose scales are stored in a format of their own (E4M3, E8M0)."""
    g = partner.target.constraint.grid if partner.target is not None else None
    return isinstance(g, FloatGrid) and g.format.scale != "float32"


def _absorbs(partner: Partner, s: Tensor) -> bool:
    """Whether the producer's grid stays of its format with row r's scales divided by s_r (a power of two)."""
    g = partner.target.constraint.grid.clone()
    g.scale = g.scale / s.to(g.scale.device)[:, None]
    rebalance_tensor_scale(g)  # as Partner.divide does
    return g.problem() is None
