"""The metric registry: every value in a result table names one of these, with its direction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    description: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("perplexity", False, "token-level perplexity, non-overlapping windows of the eval sequence length"),
        Metric("nll", False, "mean cross-entropy per example (vision) in nats"),
        Metric("top1", True, "top-1 accuracy (%)"),
        Metric("top5", True, "top-5 accuracy (%)"),
        Metric("sparsity", True, "measured fraction of exactly-zero weights in the compressed layers"),
        Metric("avg_bits", False, "packed bits per weight of the compressed layers, counting scales, zeros and masks"),
        Metric("size_bytes", False, "bytes of the whole model in its packed form (uncompressed layers at dense_bits)"),
        Metric("latency_ms", False, "median milliseconds of a fixed-shape forward"),
        Metric("latency_ms_iqr", False, "inter-quartile range of the forward timings (ms)"),
        Metric("images_per_s", True, "images per second at a fixed batch"),
        Metric("decode_ms_per_token", False, "median milliseconds per generated token with a KV cache"),
    ]
}


def register(metric: Metric) -> Metric:
    """Tasks add their own metrics (e.g. lm-eval task scores) before producing rows."""
    METRICS.setdefault(metric.name, metric)
    return METRICS[metric.name]


def higher_is_better(name: str) -> bool:
    return METRICS[name].higher_is_better
