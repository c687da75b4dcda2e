"""Batches of any task (a tensor, a dict of keywords, a tuple of positional inputs): moved and fed to a model.

A leaf module: activation quantization, calibration and evaluation all push batches through a model this way.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from torch import Tensor, nn


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a parameter called `name`."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def to_device(batch: Any, device: Any) -> Any:
    """The batch with every tensor in it on `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_forward(model: nn.Module, batch: Any) -> Any:
    """A calibration batch through the model: a tensor (first input), a dict (keywords) or a tuple (positional).
    Hugging Face models get use_cache=False: no KV cache is built or passed between blocks."""
    kw = {"use_cache": False} if accepts(model.forward, "use_cache") else {}
    if isinstance(batch, Mapping):
        return model(**batch, **kw)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **kw)
    return model(batch, **kw)
