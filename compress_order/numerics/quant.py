"""Pure quantization kernels: a uniform integer grid per output row and input group.

A grid stores one scale and one integer zero-point per (row, group). Codes are unsigned integers in
[0, 2^bits - 1] and a weight on the grid equals (code - zero) * scale. Zero-points are integers, so the value
0 is always exactly representable: quantizing a pruned (zero) weight keeps it zero, whatever the order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class QuantGrid:
    bits: int
    group_size: int  # columns per group (== in_features for per-channel)
    sym: bool
    scale: Tensor  # (rows, groups) float32, > 0
    zero: Tensor  # (rows, groups) float32, integer valued in [0, maxq]

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def _expand(self, t: Tensor) -> Tensor:
        return t.repeat_interleave(self.group_size, dim=1)

    def codes(self, w: Tensor) -> Tensor:
        """Integer codes (as float32) of the nearest grid points to w (rows, cols)."""
        s, z = self._expand(self.scale), self._expand(self.zero)
        return torch.clamp(torch.round(w.float() / s) + z, 0, self.maxq)

    def dequant(self, q: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        s, z = self._expand(self.scale), self._expand(self.zero)
        return ((q - z) * s).to(dtype)

    def project(self, w: Tensor) -> Tensor:
        """Round w onto the grid (round-to-nearest, clamped), in w's dtype."""
        return self.dequant(self.codes(w), w.dtype)

    fmt = "int"  # the element format (formats.py has the floating-point ones, with the same interface)

    def column(self, j: int) -> tuple[Tensor, Tensor]:
        """Scale and zero of input column j, shape (rows,): GPTQ and SparseGPT walk columns one at a time."""
        g = j // self.group_size
        return self.scale[:, g], self.zero[:, g]

    def round_column(self, j: int, w: Tensor) -> Tensor:
        """Column j (rows,) rounded onto its per-row grid: the inner step of GPTQ-style solvers."""
        s, z = self.column(j)
        return quantize_column(w, s, z, self.maxq)

    def group_rounder(self, g: int) -> Callable[[Tensor], Tensor]:
        """`round_column` for any column of group g, its per-row bounds taken once: the solvers' inner loop."""
        s, z = self.scale[:, g].contiguous(), self.zero[:, g]
        lo, hi = -z, self.maxq - z

        def rnd(w: Tensor) -> Tensor:
            # clamp(round(w/s), -z, maxq-z) is clamp(round(w/s) + z, 0, maxq) - z exactly (integers below 2^24);
            # + 0.0 turns -0 into +0, as the subtraction of z does.
            q = torch.div(w.float(), s).round_().clamp_(lo, hi).mul_(s).add_(0.0)
            return q.to(w.dtype)

        return rnd

    def fit_group(self, g: int, span: Tensor) -> None:
        """Refit group g's min-max range from `span` (rows, group_size): GPTQ fits a group when it reaches it."""
        self.scale[:, g], self.zero[:, g] = grid_params(span.amin(1), span.amax(1), self.bits, self.sym)

    def project_float(self, w: Tensor, rows: slice = slice(None)) -> Tensor:
        """`project(w).float()` for `w`, rows `rows` of the layer's weight, value for value: the same float32
        operations, with each group's scale and zero-point broadcast instead of expanded to the weight's shape,
        in place on one float32 copy (what the invariant check runs on every layer after every stage)."""
        s, z = self.scale[rows].unsqueeze(-1), self.zero[rows].unsqueeze(-1)
        x = w.to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(w.shape[0], -1, self.group_size)
        x.div_(s).round_().add_(z).clamp_(0, self.maxq).sub_(z).mul_(s)
        x = x.view(w.shape)
        return x if w.dtype == torch.float32 else x.to(w.dtype).float()

    def invalid(self) -> Tensor:
        """Whether `problem` has one (a 0-d bool tensor, read without a host sync)."""
        z = self.zero
        return ((z != torch.round(z)) | (z < 0) | (z > self.maxq)).any()

    def problem(self) -> str | None:
        """Why the grid is not a valid integer grid (None: it is): zero-points must be integer codes."""
        if bool(self.invalid()):
            return "zero-points are not integer codes, so 0 is not on the grid"
        return None

    def scale_bits(self) -> float:
        """Bits of the stored scales (16 each) and, when asymmetric, zero-points (`bits` each)."""
        return self.scale.numel() * (16 + (0 if self.sym else self.bits))

    def clone(self) -> "QuantGrid":
        return QuantGrid(self.bits, self.group_size, self.sym, self.scale.clone(), self.zero.clone())

    def to(self, device: torch.device | str) -> "QuantGrid":
        return QuantGrid(self.bits, self.group_size, self.sym, self.scale.to(device), self.zero.to(device))


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Round one column (rows,) onto its per-row grid: the inner step of GPTQ-style solvers."""
    q = torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)
    return ((q - zero) * scale).to(w.dtype)


def grid_params(wmin: Tensor, wmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Min-max scale and integer zero-point for ranges [wmin, wmax] (any shape); the range always holds 0."""
    maxq = 2**bits - 1
    wmin = torch.minimum(wmin.float(), torch.zeros_like(wmin, dtype=torch.float32))
    wmax = torch.maximum(wmax.float(), torch.zeros_like(wmax, dtype=torch.float32))
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    empty = (wmax - wmin) == 0  # an all-zero group: any positive scale represents it exactly
    wmin = torch.where(empty, torch.full_like(wmin, -1.0), wmin)
    wmax = torch.where(empty, torch.full_like(wmax, 1.0), wmax)
    scale = (wmax - wmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def fit_grid(w: Tensor, bits: int, group_size: int, sym: bool, clip: float = 1.0) -> QuantGrid:
    """Min-max grid for a 2-D weight (rows, cols), groups of `group_size` consecutive input columns.

    `clip` < 1 shrinks each group's range (clipped RTN); the default is plain min-max.
    """
    rows, cols = w.shape
    gs = cols if group_size <= 0 else group_size
    if cols % gs:
        raise ValueError(f"group size {gs} does not divide {cols} input features")
    wg = w.float().reshape(rows, cols // gs, gs)
    scale, zero = grid_params(wg.amin(-1) * clip, wg.amax(-1) * clip, bits, sym)
    return QuantGrid(bits, gs, sym, scale, zero)
