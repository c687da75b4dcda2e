"""Floating-point number formats for weights: an element codebook times a per-group scale in its own format.

A format fixes its element codebook, its group and how the group scale is stored:

| format | elements | group | scale |
|---|---|---|---|
| fp8 | E4M3 (±448, 256 codes less NaN) | per output channel, or 128-blocks | float32 |
| nvfp4 | E2M1 (±{0, .5, 1, 1.5, 2, 3, 4, 6}) | 16 | E4M3, over one float32 global scale per tensor |
| mxfp4 | E2M1 | 32 | E8M0: a power of two |

A weight on such a grid equals codebook[code] · scale(row, group). 0 is a code of every codebook, so a pruned
weight stays exactly zero on any grid, whatever the order. Rounding divides by the scale *as stored* (an NVFP4
scale is first rounded to E4M3, an MX scale is a power of two) and takes the nearest codebook value, ties to the
even code, saturating at the largest one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from compress_order.core.schemes import FLOAT_FORMATS, FloatFormat
from compress_order.numerics.quant import QuantGrid, fit_grid

E2M1_MAX, E4M3_MAX = 6.0, 448.0


@lru_cache(maxsize=None)
def _codebook(bits: int) -> Tensor:
    """The sorted finite values of E4M3 (8 bits) or E2M1 (4 bits), float32, each once (one zero)."""
    if bits == 8:
        allv = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        vals = allv[torch.isfinite(allv)]
    elif bits == 4:
        pos = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        vals = torch.cat([-pos[1:], pos])
    else:
        raise ValueError(f"no floating-point codebook of {bits} bits")
    return torch.unique(vals)  # sorted; -0 and +0 are one value


def codebook(bits: int, device: torch.device | str = "cpu") -> Tensor:
    return _codebook(bits).to(device)


def nearest_codes(x: Tensor, book: Tensor) -> Tensor:
    """Index of the nearest codebook value to each x (saturating; a tie goes to the value with the even
    mantissa, i.e. the even index among the positive or negative half, as IEEE round-to-nearest-even does)."""
    x = x.float().clamp(float(book[0]), float(book[-1]))
    hi = torch.searchsorted(book, x.contiguous()).clamp(1, book.numel() - 1)
    lo = hi - 1
    dlo, dhi = x - book[lo], book[hi] - x
    zero = book.numel() // 2  # codebooks are symmetric around their one zero
    # Among two neighbours, the one whose distance from zero in codes is even has the even mantissa.
    even_hi = ((hi - zero).abs() % 2) == 0
    pick_hi = (dhi < dlo) | ((dhi == dlo) & even_hi)
    return torch.where(pick_hi, hi, lo)


def round_to_codebook(x: Tensor, bits: int) -> Tensor:
    """codebook(bits)[nearest_codes(x, codebook(bits))], as float32, without the index search: E4M3 by torch's
    round-to-nearest-even cast (after saturating); E2M1 by rounding |x| to its binade's step (0.5 below 2, 1 below
    4, 2 up to 6), where torch.round's ties-to-even are the even mantissa's. For activations, rounded every forward
    pass; equal to the indexed path value for value (tests/test_formats.py)."""
    if bits == 8:
        return e4m3(x)
    if bits != 4:
        raise ValueError(f"no floating-point codebook of {bits} bits")
    xf = x.float()
    a = xf.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, xf)


def e4m3(x: Tensor) -> Tensor:
    """x rounded to E4M3 (saturating at ±448), as float32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def group_scales(
    amax: Tensor, fmt: FloatFormat, tensor_amax: Tensor | None = None, keep_tensor: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Per-group scales (as the format stores them, times the per-tensor scale) from each group's max |w|, so
    the largest weight of a group maps to (near) the codebook's largest value; and the per-tensor scale (NVFP4:
    from the whole tensor's max, or `tensor_amax`; `keep_tensor`: `tensor_amax` is that scale already)."""
    top = float(codebook(fmt.bits)[-1])
    amax = amax.float()
    if fmt.scale == "float32":
        s = amax / top
        return torch.where(s > 0, s, torch.ones_like(s)), None
    if fmt.scale == "e8m0":  # OCP MX: 2^(floor(log2 amax) - emax of the element format)
        emax = 2  # E2M1's largest value is 1.5 · 2^2
        e = torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - emax
        return torch.exp2(e.clamp(-127, 127)), None
    # NVFP4: group scale amax/6 stored in E4M3 relative to a per-tensor float32 scale amax_tensor/(6·448)
    if keep_tensor and tensor_amax is not None:
        g = tensor_amax.float()
    else:
        ta = amax.max() if tensor_amax is None else tensor_amax.float()
        g = (ta / (top * E4M3_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
    stored = e4m3(amax / top / g)
    stored = torch.where(stored > 0, stored, torch.full_like(stored, float(e4m3(torch.tensor(2.0**-9)))))
    # Divided by the global scale as compressed-tensors (and NVIDIA's kernels) apply it, so a checkpoint's loader
    # gives back these float32 scales bit for bit (stored · g can differ from stored / (1/g) in the last bit).
    return stored / nvfp4_global_scale(g), g


def nvfp4_global_scale(tensor_scale: Tensor) -> Tensor:
    """The per-tensor scale in the form NVFP4 checkpoints store it (`weight_global_scale`): its float32 reciprocal,
    by which each stored E4M3 group scale is divided."""
    return 1.0 / tensor_scale.float()


@dataclass
class FloatGrid:
    """A floating-point grid: codes index the format's codebook, value = codebook[code] · scale."""

    fmt: str
    group_size: int
    scale: Tensor  # (rows, groups) float32: the stored scale (times the per-tensor scale)
    tensor_scale: Tensor | None = None  # NVFP4's per-tensor float32 scale (the group scales are E4M3 times it)
    sym: bool = True  # no zero-point: codebooks are symmetric

    @property
    def format(self) -> FloatFormat:
        return FLOAT_FORMATS[self.fmt]

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def zero(self) -> Tensor:  # no zero-point (kept so grid-generic code can read it)
        return torch.zeros_like(self.scale)

    def _expand(self, t: Tensor) -> Tensor:
        return t.repeat_interleave(self.group_size, dim=1)

    def codes(self, w: Tensor) -> Tensor:
        return nearest_codes(w.float() / self._expand(self.scale), codebook(self.bits, w.device)).float()

    def dequant(self, q: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return (codebook(self.bits, q.device)[q.long()] * self._expand(self.scale)).to(dtype)

    def project(self, w: Tensor) -> Tensor:
        return self.dequant(self.codes(w), w.dtype)

    def round_column(self, j: int, w: Tensor) -> Tensor:
        """Column j (rows,) rounded onto its per-row grid: the inner step of GPTQ-style solvers."""
        s = self.scale[:, j // self.group_size]
        book = codebook(self.bits, w.device)
        return (book[nearest_codes(w.float() / s, book)] * s).to(w.dtype)

    def group_rounder(self, g: int) -> Callable[[Tensor], Tensor]:
        """`round_column` for any column of group g: the codebook value by rounding (`round_to_codebook`, equal
        to the indexed search value for value), the scale taken once."""
        s, bits = self.scale[:, g].contiguous(), self.bits

        def rnd(w: Tensor) -> Tensor:
            return (round_to_codebook(w.float() / s, bits) * s).to(w.dtype)

        return rnd

    def fit_group(self, g: int, span: Tensor) -> None:
        """Refit group g's scale from `span` (rows, group_size), keeping the per-tensor scale."""
        scale, _ = group_scales(span.abs().amax(1, keepdim=True), self.format, self.tensor_scale, keep_tensor=True)
        self.scale[:, g] = scale[:, 0]

    def project_float(self, w: Tensor, rows: slice = slice(None)) -> Tensor:
        """`project(w).float()` for `w`, rows `rows` of the layer's weight, value for value (a NaN weight gives NaN,
        off the grid either way): the same float32 division and product with each group's scale broadcast, and the
        nearest codebook value from `round_to_codebook` (the indexed search's) instead of a search and a gather."""
        s = self.scale[rows].unsqueeze(-1)
        x = w.to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(w.shape[0], -1, self.group_size)
        x = round_to_codebook(x.div_(s), self.bits).mul_(s).view(w.shape)
        return x if w.dtype == torch.float32 else x.to(w.dtype).float()

    def invalid(self) -> Tensor:
        """Whether `problem` has one (a 0-d bool tensor, read without a host sync)."""
        f = self.format
        s = self.scale if self.tensor_scale is None else self.scale / self.tensor_scale
        if f.scale == "e8m0":
            return (torch.exp2(torch.round(torch.log2(s))) != s).any()
        if f.scale == "e4m3+tensor":
            return (~torch.isclose(e4m3(s), s, rtol=1e-6, atol=0)).any()
        return torch.zeros((), dtype=torch.bool, device=s.device)

    def problem(self) -> str | None:
        """Why the stored scales are not of the format (None: they are)."""
        if not bool(self.invalid()):
            return None
        return (
            "MX scales are not powers of two"
            if self.format.scale == "e8m0"
            else "NVFP4 group scales are not E4M3 values"
        )

    def clone(self) -> "FloatGrid":
        ts = None if self.tensor_scale is None else self.tensor_scale.clone()
        return FloatGrid(self.fmt, self.group_size, self.scale.clone(), ts)

    def to(self, device: torch.device | str) -> "FloatGrid":
        ts = None if self.tensor_scale is None else self.tensor_scale.to(device)
        return FloatGrid(self.fmt, self.group_size, self.scale.to(device), ts)

    def scale_bits(self) -> float:
        """Bits of every stored scale: per group, plus the per-tensor scale."""
        f = self.format
        return self.scale.numel() * f.scale_bits + (32 if f.tensor_scale else 0)


def rebalance_tensor_scale(grid: "QuantGrid | FloatGrid") -> None:
    """After an NVFP4 grid's rows were divided by powers of two (a producer absorbing AWQ factors): shift the
    per-tensor scale by the power of two that brings the largest stored E4M3 scale back into (224, 448]. Stored
    scales move by powers of two, so they stay E4M3 values while in range (`problem` says when one is not)."""
    if getattr(grid, "tensor_scale", None) is None:  # an integer grid, or no per-tensor scale
        return
    top = float((grid.scale / grid.tensor_scale).max())
    if top > 0:
        grid.tensor_scale = grid.tensor_scale * 2.0 ** math.ceil(math.log2(top / E4M3_MAX))


def fit_weight_grid(
    w: Tensor, fmt: str, bits: int, group_size: int, sym: bool, clip: float = 1.0
) -> QuantGrid | FloatGrid:
    """The grid of format `fmt` fit to a 2-D weight: min-max INT (`bits`, `sym`, `clip`), or max-scaled float."""
    if fmt == "int":
        return fit_grid(w, bits, group_size, sym, clip)
    return fit_float_grid(w, fmt, group_size)


def refit_like(grid: QuantGrid | FloatGrid, w: Tensor) -> QuantGrid | FloatGrid:
    """A grid of `grid`'s kind (format, bits, group size, symmetry) fit anew to `w`: min-max for INT, max-scaled
    for a float format (NVFP4's per-tensor scale too). A range clipped when `grid` was fit (RTN's `clip`, AWQ's
    search) is not searched again."""
    return fit_weight_grid(w, grid.fmt, grid.bits, grid.group_size, grid.sym)


def lazy_grid(w: Tensor, fmt: str, bits: int, group_size: int, sym: bool) -> QuantGrid | FloatGrid:
    """A grid whose groups the solver fits as it reaches them (`fit_group`); a float grid's per-tensor scale is
    fixed now, from the whole weight."""
    rows, cols = w.shape
    ones = torch.ones(rows, cols // group_size, dtype=torch.float32, device=w.device)
    if fmt == "int":
        return QuantGrid(bits, group_size, sym, ones, torch.zeros_like(ones))
    grid = fit_float_grid(w, fmt, group_size)
    grid.scale = ones
    return grid


def fit_float_grid(w: Tensor, fmt: str, group_size: int) -> FloatGrid:
    """Max-scaled grid of format `fmt` for a 2-D weight (rows, cols), groups of `group_size` input columns."""
    f = FLOAT_FORMATS[fmt]
    rows, cols = w.shape
    gs = cols if group_size <= 0 else group_size
    if cols % gs:
        raise ValueError(f"group size {gs} does not divide {cols} input features")
    amax = w.float().abs().reshape(rows, cols // gs, gs).amax(-1)
    scale, ts = group_scales(amax, f)
    return FloatGrid(fmt, gs, scale, ts)
