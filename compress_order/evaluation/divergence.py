"""KL divergence to the dense model and top-1 agreement, on the perplexity windows (`eval.metrics`).

For every scored position t of every window (the positions perplexity scores), with p the dense model's and q the
node's next-token distribution:

- kld: KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), in nats; the per-window mean over positions is the unit sample,
  so the metric is the mean over all scored positions (windows are of equal length), as perplexity's nll;
- top1_agree: whether argmax q = argmax p; its unit sample is the share of agreeing positions of a window.

The dense distributions are computed once, from the model as it is when the task is built (the dense weights, full
precision activations), and kept in memory (`DenseReference`). The whole log-probability tensor is too large for
real vocabularies (SmolLM2: 49k tokens × 4 bytes = 200 kB per position, 4 GB for 40 windows of 512), so with
`eval.kld_topk` = k only the dense top-k tokens S of each position are kept exactly, with the log of the mass of
the rest R, P_R = 1 − Σ_S p_v, and `eval.kld_tail_samples` = m tokens s_1..s_m drawn once from p restricted to R
(fixed draws, shared by every node, so differences between nodes are paired):

    KL ≈ Σ_{v∈S} p_v log(p_v / q_v) + P_R log(P_R / Q_R) + P_R · (1/m) Σ_j [log(p_{s_j}/P_R) − log(q_{s_j}/Q_R)]

The first two terms are the KL of the distributions coarse-grained to (S, one bucket R): by the log-sum inequality
a lower bound, short of the exact KL by P_R · KL(p|R ‖ q|R), which the third term estimates without bias (a Monte
Carlo mean of that within-R divergence). The dense node gives exactly 0. With `kld_tail_samples=0` the value is the
lower bound; with `kld_topk=null` every token is kept and it is exact. Measured on SmolLM2 (RTN W4 g64, 4 windows
of 512 on Shakespeare): the lower bound alone is 14.7% short with k=128 (2.1% with k=2048), top-128 + 64 samples is
within 0.13% (tests/test_divergence.py checks the scheme against the full computation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compress_order.core.errors import UserError

# Metrics measured on the perplexity windows; perplexity is always measured (it heads the tables).
WINDOW_METRICS = ("perplexity", "kld", "top1_agree")
REFERENCE_METRICS = ("kld", "top1_agree")  # those that need the dense model's distributions


def requested(metrics: Sequence[str] | str | None) -> list[str]:
    """The reference metrics `eval.metrics` asks for; a one-line error for a name that is not a window metric."""
    names = metrics or ["perplexity"]
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in WINDOW_METRICS]
    if bad:
        raise UserError(
            f"eval.metrics: unknown metric(s) {', '.join(map(str, bad))}; valid: {', '.join(WINDOW_METRICS)}"
        )
    return [n for n in REFERENCE_METRICS if n in names]


def reject_on(metrics: Sequence[str], what: str, instead: str) -> None:
    """A task without next-token distributions (an image classifier): reference metrics are a one-line error,
    `instead` saying what that task reports."""
    asked = [n for n in REFERENCE_METRICS if n in metrics]
    if asked:
        raise UserError(
            f"eval.metrics: {', '.join(asked)} compare next-token distributions of a language model; {what}; {instead}"
        )


def topk_setting(k: Any, m: Any) -> tuple[int | None, int]:
    """(eval.kld_topk, eval.kld_tail_samples), checked."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UserError(f"eval.kld_topk={k} must be a positive integer (dense tokens kept per position) or null (all)")
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise UserError(f"eval.kld_tail_samples={m} must be an integer ≥ 0 (tokens drawn per position from the rest)")
    return k, m


@dataclass
class DenseReference:
    """The dense model's next-token distributions at every scored position, (windows, positions, ...)."""

    logp: Tensor  # (N, T, k) float32 top-k log-probabilities (all V when k covers the vocabulary)
    index: Tensor  # (N, T, k) int64 their token ids
    log_rest: Tensor  # (N, T) float32 log of the mass outside them (-inf when k = V)
    argmax: Tensor  # (N, T) int64 the dense top-1 token
    tail_index: Tensor | None = None  # (N, T, m) int64 tokens drawn from p restricted to the rest
    tail_logp: Tensor | None = None  # (N, T, m) float32 their dense log-probabilities


def _log_rest(logp: Tensor, index: Tensor) -> Tensor:
    """log Σ of exp(logp) over the tokens not in `index` (one formula for dense and node, so equal inputs agree)."""
    if index.shape[-1] == logp.shape[-1]:
        return torch.full(logp.shape[:-1], float("-inf"), device=logp.device)
    return logp.scatter(-1, index, float("-inf")).logsumexp(-1)


def reference_piece(logits: Tensor, k: int | None, m: int = 0, gen: torch.Generator | None = None) -> tuple:
    """(logp, index, log_rest, argmax, tail_index, tail_logp) of one batch of dense logits (B, T, V); `gen` draws
    the m tail tokens per position."""
    logp = torch.log_softmax(logits.float(), -1)
    v = logp.shape[-1]
    kk = v if k is None else min(int(k), v)
    if kk == v:
        index = torch.arange(v, device=logp.device).expand_as(logp)
        return logp, index, _log_rest(logp, index), logp.argmax(-1), None, None
    top, index = logp.topk(kk, -1)
    log_rest = _log_rest(logp, index)
    tail_index = tail_logp = None
    if m > 0:
        w = (logp.scatter(-1, index, float("-inf")) - log_rest[..., None]).exp().flatten(0, 1)
        w[~torch.isfinite(log_rest).flatten()] = 1.0  # no mass left outside the top-k: any draw, weighted by 0
        tail_index = torch.multinomial(w, m, replacement=True, generator=gen).view(*logp.shape[:-1], m)
        tail_logp = logp.gather(-1, tail_index)
    return top, index, log_rest, logp.argmax(-1), tail_index, tail_logp


def compare(ref: DenseReference, rows: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position KL_k(dense ‖ node) and top-1 agreement (float64, (B, T)) of the node's logits of windows `rows`."""
    logq = torch.log_softmax(logits.float(), -1)
    dev = logq.device
    logp, index = ref.logp[rows].to(dev), ref.index[rows].to(dev)
    log_rest = ref.log_rest[rows].to(dev)
    logq_s = logq.gather(-1, index)
    kl = (logp.exp() * (logp - logq_s)).sum(-1)
    rest = torch.isfinite(log_rest)  # the rest bucket has mass (k < V)
    if rest.any():
        logq_rest = _log_rest(logq, index)
        within = log_rest - logq_rest  # coarse-grained: the rest as one bucket
        if ref.tail_index is not None:  # + the sampled divergence inside the rest
            tail_p, tail_i = ref.tail_logp[rows].to(dev), ref.tail_index[rows].to(dev)
            within = within + ((tail_p - log_rest[..., None]) - (logq.gather(-1, tail_i) - logq_rest[..., None])).mean(
                -1
            )
        kl = kl + torch.where(rest, log_rest.exp() * within, torch.zeros_like(kl))
    agree = logq.argmax(-1) == ref.argmax[rows].to(dev)
    return kl.double().cpu(), agree.double().cpu()


def dense_reference(
    forward: Callable[[Tensor], Tensor], windows: Tensor, batch_size: int, k: int | None, m: int = 0, seed: int = 0
) -> DenseReference:
    """The reference of `windows` (N, L): `forward` maps a batch of windows to logits; positions 0..L-2 are kept
    (those whose next token perplexity scores). The tail draws are seeded, so a later run draws the same."""
    gen: torch.Generator | None = None
    parts = []
    for i in range(0, len(windows), batch_size):
        logits = forward(windows[i : i + batch_size])[:, :-1]
        if gen is None:
            gen = torch.Generator(device=logits.device).manual_seed(seed)
        parts.append(reference_piece(logits, k, m, gen))
    cols = [None if parts[0][j] is None else torch.cat([p[j].cpu() for p in parts]) for j in range(6)]
    return DenseReference(*cols)


def window_samples(kl: list[Tensor], agree: list[Tensor]) -> dict[str, np.ndarray]:
    """Per-window unit samples (the mean over its positions) from the per-batch (B, T) tensors."""
    return {"kld": torch.cat(kl).mean(1).numpy(), "top1_agree": torch.cat(agree).mean(1).numpy()}
