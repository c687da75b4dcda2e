"""What a node is worth: tasks (perplexity, top-1), the metric registry, compression and latency measures, KL divergence, lm-eval, packed backends."""
