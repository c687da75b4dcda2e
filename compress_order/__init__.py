"""compress-order: does the order of pruning and quantization matter, and which order wins?"""

__version__ = "0.1.0"
