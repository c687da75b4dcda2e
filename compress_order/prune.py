"""Pure pruning kernels: choose which weights to keep from a score, honouring an earlier mask."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from compress_order.constraints import required_zeros
from compress_order.errors import UserError


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights."""
    if nm in (None, "", "none"):
        return None
    try:
        n, m = (int(x) for x in str(nm).split(":"))
    except ValueError:
        raise UserError(f"N:M pattern '{nm}' is not of the form N:M (e.g. 2:4, 4:8)") from None
    if not 0 < n < m:
        raise UserError(f"N:M pattern '{nm}' needs 0 < N < M (e.g. 2:4, 4:8)")
    return n, m


def nm_sparsity(nm: tuple[int, int]) -> float:
    return 1 - nm[0] / nm[1]


def select_mask(
    score: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    prior: Tensor | None = None,
    scope: str = "layer",
) -> Tensor:
    """Keep-mask (bool, True = kept) pruning the lowest scores.

    Weights already pruned by `prior` get score -inf, so they are pruned first and stay pruned: a later
    pruning stage only ever adds zeros. `scope` = "layer" ranks the whole matrix, "row" each output row.
    With `nm`, N of every M consecutive inputs of a row are kept and `sparsity` is ignored.
    """
    score = score.float().clone()
    if prior is not None:
        score[~prior] = -math.inf
    rows, cols = score.shape
    mask = torch.ones_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        mask.reshape(rows, cols // m, m).scatter_(-1, drop, False)
    elif scope == "row":  # each row its share, the layer total exact (rows differ by at most one)
        from compress_order.obs import row_quota_mask

        return row_quota_mask(score, required_zeros(sparsity, score.numel()), prior)
    else:
        k = required_zeros(sparsity, score.numel())
        if k:
            mask.view(-1)[score.view(-1).topk(k, largest=False).indices] = False
    if prior is not None:
        mask &= prior
    return mask
