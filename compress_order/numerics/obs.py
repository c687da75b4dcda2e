"""The OBS column solver behind SparseGPT, GPTQ and their joint schedule.

Columns are processed left to right. Column j's weights w are replaced by their compressed value q (0 where
pruned, the nearest grid point where quantized) and the error e = (w - q) / U_jj is spread over the columns
still to come through row j of U, the upper Cholesky factor of H⁻¹ (Frantar et al., GPTQ; Frantar & Alistarh,
SparseGPT). Updates are applied lazily: inside a block of columns immediately, to the rest once per block.

Order safety lives here, once, for every stage built on it:
  * weights pruned by an earlier stage (`prior` False) stay exactly zero and send no error: their e is 0,
    and whatever updates reached them are dropped, which is the same as never updating them;
  * a new pruning choice ranks them at -inf, so they are always among the pruned and the mask only grows;
  * with a grid, every column written is rounded onto it, so the result lies exactly on the grid.
"""

from __future__ import annotations

import math
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
    W = W.detach().to(torch.float32).clone()
    rows, cols = W.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device) if prior is None else prior.clone()
    live = prior  # False where an earlier stage pruned: frozen at zero
    grid = rounding.grid if rounding is not None else None
    # Neither an N:M group nor a quantization group fit on the fly may straddle two lazy blocks: the
    # choice must see weights carrying all earlier updates.
    unit = 1
    if nm is not None:
        unit = math.lcm(unit, nm[1])
    if rounding is not None and rounding.fit:
        unit = math.lcm(unit, grid.group_size)
    B = unit * max(1, math.ceil(blocksize / unit))
    starts = list(range(0, cols, B))
    quotas = None
    if nm is None and n_prune > 0:
        forced = [0] * len(starts) if prior is None else [int((~prior[:, i : i + B]).sum()) for i in starts]
        quotas = spread_quota(n_prune, [rows * min(B, cols - i) for i in starts], forced)

    for b, i1 in enumerate(starts):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        K1 = keep[:, i1:i2]  # a view: choices below write into `keep`
        L1 = None if live is None else live[:, i1:i2]
        if quotas is not None and quotas[b]:
            # Adaptive mask selection: the OBS saliency w²/[H⁻¹]_jj of the current weights, per block.
            score = W1.square() / d1.square()[None, :]
            score[~K1] = -math.inf
            drop = score.flatten().topk(quotas[b], largest=False).indices
            m1 = K1.clone().flatten()
            m1[drop] = False
            K1 &= m1.view_as(K1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m].square() / d1[i : i + m].square()[None, :]
                score[~K1[:, i : i + m]] = -math.inf
                drop = score.topk(m - n, dim=1, largest=False).indices
                K1[:, i : i + m] &= torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
            w = W1[:, i]
            q = w * K1[:, i]
            if grid is not None:
                j = i1 + i if rounding.col_ids is None else rounding.col_ids[i1 + i]
                gs = grid.group_size
                if rounding.fit and j % gs == 0:  # a new group starts: its range from the current weights
                    grid.fit_group(j // gs, W1[:, i : i + gs] * K1[:, i : i + gs])
                q = grid.round_column(j, q)
            Q1[:, i] = q
            # Frozen weights send no error; updates that reached them are dropped with them.
            e = ((w if L1 is None else w * L1[:, i]) - q) / d1[i]
            E1[:, i] = e
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1.0)
        W[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return W, keep
