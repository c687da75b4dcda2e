"""Saving a node: Hugging Face checkpoints with their constraints, and compressed-tensors packing from the node's own grids."""
