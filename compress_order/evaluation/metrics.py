"""The metric registry: every value in a result table names one of these, and the registry says what it means —
its direction, how it is computed from per-unit samples (for bootstrap intervals), and whether it can head a table.

A metric with `unit_sample` is the reduction of the mean over evaluation units (LM windows, images, documents) of
that per-unit sample, as stored in samples.parquet: perplexity = exp(mean per-window nll), top1 = 100·mean(correct).
Resampling units and reapplying the reduction gives the metric's bootstrap distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compress_order.core.registry import Registry

# mean of a metric's per-unit samples → the metric; named, so that two registrations compare by value
REDUCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": np.asarray,
    "exp": np.exp,
    "percent": lambda m: 100.0 * np.asarray(m),
}


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    description: str
    unit_sample: str | None = None  # per-unit sample whose mean gives the metric; None: no intervals
    reduction: str = "identity"  # a REDUCTIONS key
    primary: bool = False  # may be a table's default metric (the first registered one present wins)
    summary: bool = False  # a column of a run's summary.md
    measured: bool = False  # of the machine and moment (time, memory), not of the weights: varies run to run

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"metric {self.name}: reduction '{self.reduction}' is not one of {sorted(REDUCTIONS)}")

    def from_mean(self, mean: np.ndarray) -> np.ndarray:
        """The metric from the mean of its per-unit samples (element-wise over an array of means)."""
        return REDUCTIONS[self.reduction](mean)


METRICS: Registry[Metric] = Registry("metric")


def register(metric: Metric) -> Metric:
    """Add a metric (tasks add their own, e.g. lm-eval task scores, before producing rows).

    Registering the same definition again is a no-op; a different definition under a registered name is an error,
    since rows already written under that name would change meaning.
    """
    return METRICS.register(metric.name, metric)


for _m in [
    Metric(
        "perplexity",
        False,
        "token-level perplexity, non-overlapping windows of the eval sequence length",
        unit_sample="nll",
        reduction="exp",
        primary=True,
        summary=True,
    ),
    Metric("top1", True, "top-1 accuracy (%)", unit_sample="correct", reduction="percent", primary=True, summary=True),
    Metric("top5", True, "top-5 accuracy (%)", unit_sample="correct_top5", reduction="percent", summary=True),
    Metric("nll", False, "mean cross-entropy per example (vision) in nats", unit_sample="nll", summary=True),
    Metric(
        "kld",
        False,
        "mean KL(dense ‖ node) of the next-token distribution (nats), on the perplexity windows",
        unit_sample="kld",
        summary=True,
    ),
    Metric(
        "top1_agree",
        True,
        "share of the perplexity windows' positions whose argmax token is the dense one's",
        unit_sample="top1_agree",
        summary=True,
    ),
    Metric("sparsity", True, "measured fraction of exactly-zero weights in the compressed layers", summary=True),
    Metric(
        "avg_bits",
        False,
        "packed bits per weight of the compressed layers, counting scales, zeros and masks",
        summary=True,
    ),
    Metric(
        "coverage",
        True,
        "share of the targeted weight matrices' elements that the node's stages compressed: on a quantization "
        "grid, pruned (one weight or more) or removed; a transform (smoothquant) compresses nothing "
        "(targets: every weight matrix outside embeddings, biases and model.skip)",
        summary=True,
    ),
    Metric(
        "size_bytes",
        False,
        "bytes of the whole model in its packed form (uncompressed layers at dense_bits)",
        summary=True,
    ),
    Metric(
        "blocks_removed",
        False,
        "decoder blocks the node's stages removed (sleb), on nodes that removed any; their weights count as "
        "zeros in sparsity and as removed in coverage",
    ),
    Metric("latency_ms", False, "median milliseconds of a fixed-shape forward", summary=True, measured=True),
    Metric("latency_ms_iqr", False, "inter-quartile range of the forward timings (ms)", measured=True),
    Metric("images_per_s", True, "images per second at a fixed batch", measured=True),
    Metric("decode_ms_per_token", False, "median milliseconds per generated token with a KV cache", measured=True),
    Metric(
        "peak_mem_mb",
        False,
        "peak memory (MB) while the node's stage was applied and it was evaluated: CUDA "
        "tensors allocated on a GPU, the process's resident set on CPU",
        measured=True,
    ),
]:
    register(_m)


def higher_is_better(name: str) -> bool:
    return METRICS[name].higher_is_better


def primary_metrics() -> list[str]:
    """Metrics that may head a table, in order of preference."""
    return [m.name for m in METRICS.values() if m.primary]


def summary_metrics() -> list[str]:
    """Columns of a run's summary, in order."""
    return [m.name for m in METRICS.values() if m.summary]
