"""Input-channel rescaling that keeps the model's function: the scaling pairs behind AWQ and SmoothQuant.

Linear layers fed the same tensor X (q/k/v, gate/up) compute X Wᵀ = (X diag(s)⁻¹)(W diag(s))ᵀ for any positive s.
The division by s is folded into whatever produced X: a norm's weight (and bias), or the output rows of a linear
layer whose outputs reach X only through channel-wise positively homogeneous operations (attention mixing V into
O's input, ReLU, SwiGLU's elementwise product with `up`). Which producer that is, is not written per model: each
candidate of the right width inside the unit (a norm-like module with a 1-D weight, or a linear target) is tried
with random scales on one calibration sample, and kept when the unit's output does not change.

Constraints (constraints.py) under rescaling:
- a mask survives: zeros times any factor stay zero;
- a producer's grid survives exactly: dividing output row r by s_r divides that row's scales by s_r (codes and
  zero-points unchanged);
- a consumer's grid survives only if s is constant within each of its quantization groups (then group g's scales
  multiply by s_g). SmoothQuant therefore averages its factors per group (geometric mean) after a quantizer, and
  reports a per-channel grid (one group spanning every input) as infeasible. AWQ re-quantizes its consumers itself.
Weights are re-projected onto the rescaled grid, so float rounding cannot move them off it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from compress_order.modeling.act import paused as act_paused
from compress_order.modeling.targets import Target, adapter_of
from compress_order.numerics.formats import rebalance_tensor_scale

log = logging.getLogger(__name__)


# How a norm's weight w scales its output: by w itself (LayerNorm, LLaMA's RMSNorm), or by 1 + w (Gemma's
# RMSNorm stores the offset from one). Dividing the output by s rewrites w accordingly; the probe tries both.
NORM_FOLDS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "w": lambda w, s: w / s,
    "1+w": lambda w, s: (1 + w) / s - 1,
}


@dataclass
class Partner:
    """What produces a group's input: a norm-like module (with its fold rule), or a linear target (its rows)."""

    name: str
    module: nn.Module
    target: Target | None = None
    fold: str = "w"

    def __str__(self) -> str:
        return self.name if self.fold == "w" else f"{self.name} ({self.fold})"

    @torch.no_grad()
    def divide(self, s: Tensor) -> None:
        """Divide the produced channels by s, keeping this layer's constraints (a grid is rescaled per row)."""
        if self.target is None:
            w = self.module.weight
            w.data.copy_(NORM_FOLDS[self.fold](w.data.float(), s.to(w.device).float()).to(w.dtype))
        else:
            t = self.target
            s = s.to(t.device)
            w = t.weight.float() / s[:, None]
            c = t.constraint
            if c.grid is not None:
                c.grid.scale = c.grid.scale / s[:, None].to(c.grid.scale.device)
                rebalance_tensor_scale(c.grid)  # NVFP4: its E4M3 scales back in range (AWQ's powers of two)
                w = c.grid.project(w)
            if c.mask is not None:
                w = w * c.mask
            t.set_weight(w.to(t.dtype))
        bias = getattr(self.module, "bias", None)
        if isinstance(bias, Tensor):
            bias.data.copy_((bias.data.float() / s.to(bias.device)).to(bias.dtype))


def group_constant(s: Tensor, group_size: int) -> Tensor:
    """s averaged geometrically within each run of `group_size` columns: factors a group grid can absorb."""
    g = s.float().clamp_min(1e-12).log().reshape(-1, group_size).mean(-1)
    return g.exp().repeat_interleave(group_size)


@torch.no_grad()
def multiply_columns(t: Target, s: Tensor) -> None:
    """W ← W·diag(s) keeping the mask and, where s is constant per group, the grid (rescaled, re-projected)."""
    s = s.to(t.device)
    w = t.weight.float() * s[None, :]
    c = t.constraint
    if c.grid is not None:
        gs = c.grid.group_size
        per_group = s.reshape(-1, gs)
        if not torch.all(per_group == per_group[:, :1]):
            raise ValueError(f"{t.name}: factors vary inside a quantization group of {gs} columns")
        c.grid.scale = c.grid.scale * per_group[:, 0][None, :].to(c.grid.scale.device)
        w = c.grid.project(w)
    if c.mask is not None:
        w = w * c.mask
    t.set_weight(w.to(t.dtype))


def float_grid_obstacle(targets: dict[str, Target]) -> str | None:
    """Why input factors cannot be absorbed by a floating-point grid: its scales are stored in their own format
    (E4M3, powers of two), which a rescaled scale leaves."""
    t = next((t for t in targets.values() if t.constraint.grid is not None and t.constraint.grid.fmt != "int"), None)
    if t is None:
        return None
    return (
        f"{t.name} holds a {t.constraint.grid.fmt} grid whose scales are stored in their own format, so "
        f"rescaling its input channels would move them off it"
    )


def grid_obstacle(targets: list[Target]) -> str | None:
    """Why input factors could not be absorbed by these layers' grids (None when they can): a per-channel grid,
    or groups of different sizes in one group of layers fed the same input."""
    sizes = {t.constraint.grid.group_size for t in targets if t.constraint.grid is not None}
    for t in targets:
        g = t.constraint.grid
        if g is not None and g.group_size >= t.shape[1]:
            return (
                f"{t.name} holds a per-channel {g.bits}-bit grid (one scale per row), so scaling its input "
                f"channels would move its weights off that grid"
            )
    if len(sizes) > 1:
        return f"{targets[0].name} and the layers sharing its input hold grids of group sizes {sorted(sizes)}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Finding the producer of each group's input


def first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if isinstance(out, dict) or hasattr(out, "values"):  # a transformers ModelOutput
        return next(v for v in out.values() if isinstance(v, Tensor))
    raise TypeError(f"cannot read a tensor from a {type(out).__name__} output")


def _candidates(unit: nn.Module, group: list[Target], targets: list[Target]) -> list[Partner]:
    cols = group[0].shape[1]
    ids = {id(t.module) for t in targets}
    in_group = {id(t.module) for t in group}
    norms = [
        Partner(name, m, fold=fold)
        for name, m in unit.named_modules()
        if id(m) not in ids
        and isinstance(getattr(m, "weight", None), Tensor)
        and m.weight.dim() == 1
        and m.weight.shape[0] == cols
        for fold in NORM_FOLDS
    ]
    names = {id(m): name for name, m in unit.named_modules()}
    linears = [
        Partner(names.get(id(t.module), t.name), t.module, t)
        for t in targets
        if id(t.module) not in in_group and t.adapter.linear and t.shape[0] == cols
    ]
    return norms + linears


@torch.no_grad()
def find_partners(
    run: Callable[[int], Any], unit: nn.Module, groups: list[list[Target]], targets: list[Target]
) -> dict[int, Partner]:
    """For each group (by index) of linear layers, the producer whose output channels can absorb a division of the
    group's inputs, verified on sample 0: random factors in [1/e, e] applied to both must leave the unit's output
    unchanged (to float tolerance). Groups without one are left out."""
    gen = torch.Generator().manual_seed(0)
    found: dict[int, Partner] = {}
    with act_paused():  # activation rounding would differ between the two sides of the comparison
        ref = first_tensor(run(0)).float()
        tol = 1e-4 if unit_dtype(unit) == torch.float32 else 2e-2  # half precision rounds the probe too
        for i, group in enumerate(groups):
            if not all(adapter_of(t.module) is not None and adapter_of(t.module).linear for t in group):
                continue  # a convolution's columns are channel×kernel positions, not channels
            cols = group[0].shape[1]
            s = torch.exp(torch.rand(cols, generator=gen) * 2 - 1)
            for cand in _candidates(unit, group, targets):
                saved = [(p, p.data.clone()) for p in _touched(cand, group)]
                try:
                    _raw_divide(cand, s)
                    for t in group:
                        t.set_weight(t.weight * s.to(t.device)[None, :].to(t.dtype))
                    out = first_tensor(run(0)).float()
                finally:
                    for p, data in saved:
                        p.data.copy_(data)
                err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
                if err < tol:
                    found[i] = cand
                    break
    return found


def unit_dtype(unit: nn.Module) -> torch.dtype:
    p = next(unit.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _touched(cand: Partner, group: list[Target]) -> list[nn.Parameter]:
    ps = [cand.module.weight] + [t.module.weight for t in group]
    if isinstance(getattr(cand.module, "bias", None), Tensor):
        ps.append(cand.module.bias)
    return ps


def _raw_divide(cand: Partner, s: Tensor) -> None:
    """The probe's division: no constraints, restored right after."""
    if cand.target is None:
        w = cand.module.weight
        w.data.copy_(NORM_FOLDS[cand.fold](w.data.float(), s.to(w.device).float()).to(w.dtype))
    else:
        t = cand.target
        t.set_weight(t.weight / s.to(t.device, t.dtype)[:, None])
    bias = getattr(cand.module, "bias", None)
    if isinstance(bias, Tensor):
        bias.data.div_(s.to(bias.device, bias.dtype))
