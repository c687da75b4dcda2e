"""What the stages see of a loaded model: its compressible layers and snapshots, coverage, MoE experts, layer statistics, activation quantization, input rescaling, forwards."""
