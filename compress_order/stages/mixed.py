"""Mixed-precision round-to-nearest: every layer is quantized like RTN, but at its own bit width.

A layer's width comes from the first `bits_map` regex that its name matches (searched, not anchored); the
remaining layers get the default `bits`, or, with an average-bit `budget`, a width allocated greedily by a
data-free sensitivity: how much the layer's weight reconstruction error ‖W − Q_b(W)‖² grows per bit removed.
The budget counts weights of all compressed layers (scales and zero-points are reported by avg_bits, not
budgeted), so `budget=3` means 3 bits per weight on average, mapped layers included.

The plan is made once, in `validate`, from the weights before any stage runs: every order then quantizes each
layer at the same width, so comparing orders compares orders, not allocations.

Number formats: a `bits_map` value may name a float format instead of a width (`{down_proj: fp8, q_proj: nvfp4}`):
that layer is rounded onto the format's grid with the format's own group (nvfp4 16, mxfp4 32, fp8 per channel),
the others as before. `format` (the root's) is the grid of the layers no pattern maps; the budget allocates
integer widths, so it needs format=int.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from compress_order.core.errors import UserError
from compress_order.core.schemes import FLOAT_FORMATS, format_group
from compress_order.core.specs import BITS
from compress_order.modeling.targets import Target
from compress_order.numerics.formats import fit_float_grid
from compress_order.numerics.quant import fit_grid
from compress_order.stages.base import QuantMixin, Stage, set_quantized


def allocate_bits(
    errors: dict[str, dict[int, float]], sizes: dict[str, int], total_bits: float, choices: list[int]
) -> dict[str, int]:
    """Greedy allocation: start every layer at the narrowest width, then repeatedly widen the layer whose next
    width removes the most error per added bit, as long as the total stays within `total_bits`."""
    bits = {n: choices[0] for n in errors}
    spent = sum(sizes[n] * choices[0] for n in errors)
    if spent > total_bits * (1 + 1e-9):
        raise UserError(f"the budget leaves under {choices[0]} bits per budgeted weight; raise budget or lower choices")
    while True:
        best: tuple[float, str, int, int] | None = None  # (error removed per bit, layer, wider width, cost)
        for n, b in bits.items():
            wider = next((c for c in choices if c > b), None)
            if wider is None:
                continue
            cost = sizes[n] * (wider - b)
            gain = (errors[n][b] - errors[n][wider]) / cost
            if spent + cost <= total_bits * (1 + 1e-9) and gain > (best[0] if best else 0.0):
                best = (gain, n, wider, cost)
        if best is None:
            return bits
        _, layer, wider, cost = best
        bits[layer] = wider
        spent += cost


class MixedRTN(QuantMixin, Stage):
    kind = "quantize"

    def __init__(
        self,
        bits: int,  # width of layers no bits_map pattern matches (when there is no budget)
        bits_map: dict[str, int | str] | None = None,  # layer-name regex → bits or a float format, first match
        # wins, e.g. {down_proj: 4} or {down_proj: fp8}
        budget: float | None = None,  # average bits per weight over all compressed layers; None: no allocation
        choices: list[int] = (2, 3, 4, 8),  # widths the budget allocator may give a layer
        group_size: int = -1,
        sym: bool = False,
        clip: float = 1.0,  # integer layers' range shrink (as rtn's)
        format: str = "int",  # the grid of layers no bits_map pattern maps: int | fp8 | nvfp4 | mxfp4
        **kw: Any,
    ):
        super().__init__(**kw)
        self._init_quant(bits, group_size, sym, format)  # the default width (and the row's `bits`)
        if format != "int" and (clip != 1.0 or budget is not None):
            what = f"clip={clip} shrinks integer ranges" if clip != 1.0 else f"budget={budget} allocates integer widths"
            raise UserError(
                f"rtn_mixed {what}; format={format} is max-scaled at its own width (use format=int, "
                f"naming float formats per layer in bits_map)"
            )
        self.clip = float(clip)
        self.bits_map = [(_regex(p), _width(b, f"bits_map['{p}']")) for p, b in (bits_map or {}).items()]
        self.choices = sorted({_width(c, "choices") for c in choices})
        if budget is not None and not self.choices[0] <= float(budget) <= self.choices[-1]:
            raise UserError(f"budget={budget} average bits is outside choices {self.choices[0]}-{self.choices[-1]}")
        self.budget = None if budget is None else float(budget)
        self.plan: dict[str, int | str] = {}  # layer name → bits, or a float format's name; set by validate

    def model_checks(self) -> list[str]:
        formats = sorted({b for _, b in self.bits_map if isinstance(b, str)})
        own = [f"{self.label}: the groups of {', '.join(formats)} divide their layers' inputs"] if formats else []
        return [*super().model_checks(), *own]

    def _mapped(self, name: str) -> int | str | None:
        return next((b for pattern, b in self.bits_map if pattern.search(name)), None)

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_groups(targets)
        self.plan = self.allocate(targets)
        for name, b in self.plan.items():
            group = format_group(b, self.group_size) if isinstance(b, str) else 0
            if group > 0 and targets[name].shape[1] % group:
                raise UserError(
                    f"rtn_mixed maps {name} to {b}, whose groups of {group} do not divide its "
                    f"{targets[name].shape[1]} input features"
                )

    @torch.no_grad()
    def allocate(self, targets: dict[str, Target]) -> dict[str, int | str]:
        plan = {n: b for n in targets if (b := self._mapped(n)) is not None}
        free = [n for n in targets if n not in plan]
        if self.budget is None:
            return {**plan, **{n: self.bits for n in free}}
        sizes = {n: t.weight.numel() for n, t in targets.items()}
        total = self.budget * sum(sizes.values()) - sum(sizes[n] * _bits(b) for n, b in plan.items())
        errors = {n: {b: self._error(targets[n], b) for b in self.choices} for n in free}
        return {**plan, **allocate_bits(errors, {n: sizes[n] for n in free}, total, self.choices)}

    def _error(self, target: Target, bits: int) -> float:
        w = target.weight.float()
        grid = fit_grid(w, bits, self.group_size, self.sym, self.clip)
        return float((grid.project(w) - w).pow(2).sum())

    def compress(self, target: Target, stats: Any = None) -> None:
        if target.name in self.plan:
            bits = self.plan[target.name]
        elif self.budget is None:
            bits = self._mapped(target.name) or self.bits
        else:
            raise RuntimeError(f"{self.label}: no bit plan for {target.name}; validate(targets) must run first")
        w = target.weight
        if isinstance(bits, str):  # a float format the map names, at that format's own group
            grid = fit_float_grid(w, bits, format_group(bits, self.group_size))
        elif self.format != "int" and self._mapped(target.name) is None:  # unmapped: the stage's format
            grid = self._fit(w)
        else:
            grid = fit_grid(w, bits, self.group_size, self.sym, self.clip)
        set_quantized(target, grid.project(w), grid, self.label)


def _width(bits: Any, what: str) -> int | str:
    """A map value: bits (2-8), or the name of a float format."""
    if isinstance(bits, str) and bits in FLOAT_FORMATS:
        return bits
    if isinstance(bits, str):
        raise UserError(f"{what}={bits} is neither 2-8 bits nor a float format ({', '.join(FLOAT_FORMATS)})")
    return BITS.check(bits, what)


def _bits(b: int | str) -> int:
    """The element bits of a plan entry."""
    return FLOAT_FORMATS[b].bits if isinstance(b, str) else b


def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"bits_map key '{pattern}' is not a regular expression: {e}") from None
