"""Pure pruning kernels: choose which weights to keep from a score, honouring an earlier mask, with exact quotas."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from compress_order.core.errors import UserError
from compress_order.numerics.constraints import required_zeros


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
    elif scope not in ("layer", "row"):
        raise ValueError(f"scope={scope!r}: 'layer' or 'row'")
    elif scope == "row":  # each row its share, the layer total exact (rows differ by at most one)
        return row_quota_mask(score, required_zeros(sparsity, score.numel()), prior)
    else:
        k = required_zeros(sparsity, score.numel())
        if k:
            mask.view(-1)[score.view(-1).topk(k, largest=False).indices] = False
    if prior is not None:
        mask &= prior
    return mask


def spread_quota(total: int, sizes: list[int], forced: list[int]) -> list[int]:
    """How many weights each unit (a column block, or a row) prunes, so the layer prunes exactly
    max(total, Σ forced) in all: in proportion to the unit sizes, never fewer than a unit's forced
    (already pruned) weights, and never so many early that later forced weights would overshoot."""
    n = sum(sizes)
    goal = max(int(total), sum(forced))
    future = sum(forced)
    done = end = 0
    out = []
    for size, f in zip(sizes, forced):
        end += size
        future -= f
        cum = (2 * goal * end + n) // (2 * n)  # round(goal · end / n), in integers
        k = min(size, max(f, min(cum - done, goal - done - future)))
        out.append(k)
        done += k
    if done != goal:  # unreachable by construction; a silent miss would break the sparsity promise
        raise RuntimeError(f"pruning quota spread to {done} weights instead of {goal}")
    return out


def select_per_row(score: Tensor, counts: Tensor) -> Tensor:
    """Keep-mask pruning the `counts[r]` lowest scores of each row r."""
    counts = counts.to(score.device)
    kmax = int(counts.max()) if counts.numel() else 0
    mask = torch.ones_like(score, dtype=torch.bool)
    if kmax == 0:
        return mask
    # One partial sort for every row (counts differ by little), ascending; each row prunes its first counts[r].
    idx = score.topk(kmax, dim=1, largest=False, sorted=True).indices
    pruned = torch.arange(kmax, device=score.device)[None, :] < counts[:, None]
    return mask.scatter_(1, idx, ~pruned)


def row_quota_mask(score: Tensor, sparsity_count: int, prior: Tensor | None = None) -> Tensor:
    """Per-row pruning with an exact layer total: every row prunes its share (differing by at most one
    between rows) of `sparsity_count`, and earlier pruned weights (score -inf) are always among them."""
    score = score.float().clone()
    rows, cols = score.shape
    forced = [0] * rows if prior is None else (~prior).sum(1).tolist()
    if prior is not None:
        score[~prior] = -math.inf
    counts = torch.tensor(spread_quota(sparsity_count, [cols] * rows, forced))
    mask = select_per_row(score, counts)
    return mask if prior is None else mask & prior
