"""The packed backends as `compress-order list` shows them: name, device types with a kernel, description.
Their kernels live in evaluation/backends.py, which builds its registry from this table; kept apart so listing
imports no torch."""

from __future__ import annotations

BACKEND_TABLE: dict[str, tuple[tuple[str, ...], str]] = {
    "int8_weight_only": (
        ("cpu", "cuda"),
        "torchao Int8Tensor of the node's codes (up to 8 bits), activations in the model's dtype",
    ),
    "int4_weight_only": (
        ("cpu", "cuda"),
        "torchao int4 tinygemm of the node's codes (up to 4 bits, groups of 32-256), bf16 activations",
    ),
    "sparse_2_4": (("cuda",), "2:4 semi-structured sparse matmul (torch.sparse), fp16"),
}
