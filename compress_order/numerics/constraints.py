"""Per-layer constraints that every later stage must keep, and the invariants checked after every stage.

A compressed layer carries its pruning mask (with the sparsity and N:M pattern it promised) and its
quantization grid. Whatever the order of stages, after each one:
  * pruned weights are exactly zero and the layer's sparsity is at least the promised target,
  * an N:M pattern holds in every group of M consecutive input weights of every row,
  * every weight lies exactly on the recorded grid (so at most 2^bits levels per group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from compress_order.core.errors import InvariantError
from compress_order.numerics.quant import QuantGrid


@dataclass
class LayerConstraint:
    mask: Tensor | None = None  # bool (rows, cols); True = weight kept
    min_sparsity: float = 0.0  # largest sparsity target promised by a pruning stage
    nm: tuple[int, int] | None = None  # N kept in every M consecutive inputs
    grid: QuantGrid | None = None
    applied: list[str] = field(default_factory=list)  # stage labels, in order
    dropped: bool = False  # an expert removed by expert pruning: all zero, never routed to, never compressed again

    def clone(self, device: torch.device | str | None = None) -> "LayerConstraint":
        dev = device if device is not None else (self.mask.device if self.mask is not None else None)
        return LayerConstraint(
            mask=None if self.mask is None else self.mask.to(dev, copy=True),
            min_sparsity=self.min_sparsity,
            nm=self.nm,
            grid=None if self.grid is None else (self.grid.to(dev) if dev is not None else self.grid.clone()),
            applied=list(self.applied),
            dropped=self.dropped,
        )

    def keep_mask(self, shape: torch.Size, device: torch.device) -> Tensor:
        """The current mask, or all-True when the layer was never pruned."""
        if self.mask is None:
            return torch.ones(shape, dtype=torch.bool, device=device)
        return self.mask


def required_zeros(sparsity: float, numel: int) -> int:
    """How many weights a sparsity target prunes: rounded to the nearest whole weight."""
    return int(round(sparsity * numel))


def nm_holds(mask: Tensor, n: int, m: int) -> bool:
    rows, cols = mask.shape
    kept = mask.reshape(rows, cols // m, m).sum(-1)
    return bool((kept <= n).all())


def check_invariants(name: str, w: Tensor, c: LayerConstraint) -> None:
    """Raise InvariantError naming the layer and the broken constraint."""
    where = f"layer {name} after [{' > '.join(c.applied)}]"
    if c.dropped and bool((w != 0).any()):
        raise InvariantError(f"{where}: a removed expert has non-zero weights")
    if c.mask is not None:
        if c.mask.shape != w.shape:
            raise InvariantError(f"{where}: mask shape {tuple(c.mask.shape)} != weight {tuple(w.shape)}")
        refilled = int((w[~c.mask] != 0).sum())
        if refilled:
            raise InvariantError(f"{where}: {refilled} pruned weights are non-zero")
        need = required_zeros(c.min_sparsity, w.numel())
        have = int((~c.mask).sum())
        if have < need:
            raise InvariantError(f"{where}: {have} pruned weights < {need} required by sparsity {c.min_sparsity}")
        if c.nm is not None and not nm_holds(c.mask, *c.nm):
            raise InvariantError(f"{where}: {c.nm[0]}:{c.nm[1]} pattern broken")
    if c.grid is not None:
        g = c.grid
        if g.scale.shape != (w.shape[0], w.shape[1] // g.group_size):
            raise InvariantError(f"{where}: grid shape {tuple(g.scale.shape)} does not fit weight {tuple(w.shape)}")
        off = int((g.project(w) != w).sum())
        if off:
            kind = "" if g.fmt == "int" else f" {g.fmt}"
            raise InvariantError(f"{where}: {off} weights are off the {g.bits}-bit{kind} grid")
        why = g.problem()
        if why is not None:
            raise InvariantError(f"{where}: {why}")


def levels_per_group(w: Tensor, group_size: int) -> Tensor:
    """Distinct values in each (row, group): a direct count, used by tests and reports."""
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group_size, group_size)
    s = wg.sort(-1).values
    return (s[..., 1:] != s[..., :-1]).sum(-1) + 1
