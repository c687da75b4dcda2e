"""Forwards of a model larger than the compute device: the model stays on its home device (CPU) and each block of
its block list is moved onto the compute device only while it runs (`eval.offload`).

Weights are moved, not copied (module.to keeps the Parameter objects), so the targets, their constraints and the
trie's snapshots see the same tensors before and after; at most one block's weights plus everything outside
the blocks (embeddings, final norm, head) occupy the device at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def _blocks_detached(model: nn.Module, list_name: str) -> Iterator[nn.ModuleList]:
    """The block list, taken out of the model for the duration (so `model.to` moves only what is around it)."""
    parent_name, _, attr = list_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = parent._modules[attr]
    parent._modules[attr] = nn.ModuleList()
    try:
        yield blocks  # type: ignore[misc]
    finally:
        parent._modules[attr] = blocks


@contextmanager
def streamed(model: nn.Module, list_name: str, device: torch.device) -> Iterator[None]:
    """Within the context, forwards of `model` compute on `device` one block at a time: what lies outside the
    block list moves there for the duration, each block when it is called and back to its home when it returns.
    On exit everything is back where it was (also after an error mid-forward)."""
    blocks = model.get_submodule(list_name)
    home = next(blocks.parameters()).device

    def arrive(block: nn.Module, args: tuple) -> None:
        block.to(device)

    def leave(block: nn.Module, args: tuple, out: object) -> None:
        block.to(home)

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(arrive), b.register_forward_hook(leave))]
    with _blocks_detached(model, list_name):
        model.to(device)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with _blocks_detached(model, list_name) as detached:
            model.to(home)
            detached.to(home)  # a block whose forward raised stayed on the device
