"""The OBS column solver behind SparseGPT, GPTQ and their joint schedule.

Columns are processed left to right. Column j's weights w are replaced by their compressed value q (0 where
pruned, the nearest grid point where quantized) and the error e = (w - q) / U_jj is spread over the columns
still to come through row j of U, the upper Cholesky factor of H⁻¹ (Frantar et al., GPTQ; Frantar & Alistarh,
SparseGPT). Updates are applied lazily, two levels deep: inside a sub-block of columns immediately, to the rest of
the block once per sub-block, to the columns after the block once per block (the last two as one matrix product
each, where the column-by-column rank-1 updates would be memory-bound).

Order safety lives here, once, for every stage built on it:
  * weights pruned by an earlier stage (`prior` False) stay exactly zero and send no error: their e is 0,
    and whatever updates reached them are dropped, which is the same as never updating them;
  * a new pruning choice ranks them at -inf, so they are always among the pruned and the mask only grows;
  * with a grid, every column written is rounded onto it, so the result lies exactly on the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from compress_order.numerics.prune import spread_quota
from compress_order.numerics.quant import QuantGrid


@dataclass
class ColumnGrid:
    """How the solver rounds columns: onto `grid` as it is, or (fit=True) onto per-group ranges fit from the
    current, already-updated weights when a group's first column is reached (written into `grid`).
    `col_ids[j]` is the original column of processed column j (act-order); None = identity."""

    grid: QuantGrid  # or a formats.FloatGrid: the same interface
    fit: bool = False
    col_ids: list[int] | None = None


@torch.no_grad()
def obs_solve(
    W: Tensor,
    U: Tensor,
    prior: Tensor | None = None,
    n_prune: int = 0,
    nm: tuple[int, int] | None = None,
    rounding: ColumnGrid | None = None,
    blocksize: int = 128,
) -> tuple[Tensor, Tensor]:
    """Prune and/or quantize W (rows, cols) column by column with OBS error feedback.

    `U`: upper Cholesky factor of the damped H⁻¹, in W's column order. `prior`: keep-mask of an earlier stage.
    `n_prune`: total pruned weights wanted (unstructured, earlier ones included), chosen adaptively per block
    by w²/U_jj² on the current weights. `nm`: instead, keep N of every M columns, chosen every M columns.
    Returns (compressed W in float32, keep-mask).
    """
    if rounding is not None and rounding.fit and rounding.col_ids is not None:
        raise ValueError("groups fit on the fly need the original column order (use a static grid with act-order)")
    rows, cols = W.shape
    # Work on the transpose: column j is then the contiguous row Wt[j], so the per-column steps and the rank-1
    # updates stream through contiguous memory. clone(): a copy even where .T is already contiguous (1 row).
    Wt = W.detach().to(torch.float32).T.clone(memory_format=torch.contiguous_format)
    U = U.to(torch.float32)
    d = U.diagonal()
    if prior is None:
        keep = torch.ones(cols, rows, dtype=torch.bool, device=W.device)
        live = None
    else:
        keep = prior.T.clone(memory_format=torch.contiguous_format)
        live = prior.T.contiguous()  # False where an earlier stage pruned: frozen at zero
    prunes = prior is not None or n_prune > 0 or nm is not None
    grid = rounding.grid if rounding is not None else None
    # Neither an N:M group nor a quantization group fit on the fly may straddle two lazy blocks: the
    # choice must see weights carrying all earlier updates.
    periods = []
    if nm is not None:
        periods.append(nm[1])
    if rounding is not None and rounding.fit:
        periods.append(grid.group_size)
    unit = math.lcm(1, *periods)
    B = unit * max(1, math.ceil(blocksize / unit))
    sub = _sub_block(B, periods)
    starts = list(range(0, cols, B))
    quotas = None
    if nm is None and n_prune > 0:
        forced = [0] * len(starts) if prior is None else [int((~prior[:, i : i + B]).sum()) for i in starts]
        quotas = spread_quota(n_prune, [rows * min(B, cols - i) for i in starts], forced)
    E = torch.empty(min(B, cols), rows, dtype=torch.float32, device=W.device)  # errors of the current block
    rounders: dict[int, Callable[[Tensor], Tensor]] = {}

    for b, i1 in enumerate(starts):
        i2 = min(i1 + B, cols)
        if quotas is not None and quotas[b]:
            # Adaptive mask selection: the OBS saliency w²/[H⁻¹]_jj of the current weights, per block.
            score = Wt[i1:i2].square().div_(d[i1:i2, None].square())
            score[~keep[i1:i2]] = -math.inf
            keep[i1:i2] &= ~lowest(score.view(-1), quotas[b]).view_as(score)
        for s1 in range(i1, i2, sub):
            s2 = min(s1 + sub, i2)
            for j in range(s1, s2):
                if nm is not None and (j - i1) % nm[1] == 0:
                    n, m = nm
                    score = Wt[j : j + m].T.square().div_(d[j : j + m].square())
                    score[~keep[j : j + m].T] = -math.inf
                    drop = score.topk(m - n, dim=1, largest=False).indices
                    keep[j : j + m] &= torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False).T
                w = Wt[j]
                q = w * keep[j] if prunes else w
                if grid is not None:
                    col = j if rounding.col_ids is None else rounding.col_ids[j]
                    gs = grid.group_size
                    g = col // gs
                    if rounding.fit and col % gs == 0:  # a new group starts: its range from the current weights
                        grid.fit_group(g, (Wt[j : j + gs] * keep[j : j + gs]).T)
                        rounders.pop(g, None)
                    if g not in rounders:
                        rounders[g] = grid.group_rounder(g)
                    q = rounders[g](q)
                # Frozen weights send no error; updates that reached them are dropped with them.
                e = E[j - i1]
                torch.sub(w if live is None else w * live[j], q, out=e)
                e.div_(d[j])
                if j + 1 < s2:
                    Wt[j + 1 : s2].addr_(U[j, j + 1 : s2], e, alpha=-1.0)
                if q is not w:
                    w.copy_(q)
            # The columns after this sub-block, to the block's end, get its errors in one product.
            if s2 < i2:
                Wt[s2:i2].addmm_(U[s1:s2, s2:i2].T, E[s1 - i1 : s2 - i1], alpha=-1.0)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E[: i2 - i1], alpha=-1.0)
    return Wt.T.contiguous(), keep.T.contiguous()


SUB_BLOCK = 32  # columns updated one by one inside a lazy block; the rest of the block takes one product per sub-block


def _sub_block(B: int, periods: list[int]) -> int:
    """The nested block size: every choice period p (an N:M group, a group fit on the fly) must start at a
    sub-block boundary or lie inside one sub-block, so it sees weights carrying all earlier updates."""
    sub = min(SUB_BLOCK, B)
    if any(p % sub and sub % p for p in periods):
        return B  # no nesting: the whole block column by column, as the lazy block alone does
    return sub


def lowest(score: Tensor, k: int) -> Tensor:
    """Mask of the k lowest entries of a 1-D score, ties at the threshold taken in index order (a selection
    by the k-th value: cheaper than topk for a k near half the entries)."""
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= score.numel():
        return torch.ones_like(score, dtype=torch.bool)
    v = score.kthvalue(k).values
    out = score < v
    tie = score == v
    need = k - int(out.sum())
    return out | (tie & (tie.cumsum(0) <= need))
