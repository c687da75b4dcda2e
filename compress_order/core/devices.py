"""The compute device a setting names (`device=auto|cpu|cuda|cuda:N`), refused in one line where it is absent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compress_order.core.errors import UserError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, key: str = "device") -> torch.device:
    import torch  # here: the configuration edge checks a config without loading torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name} but CUDA is not available here; valid: auto, cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"{key}={name} is unknown; valid: auto, cpu, cuda, cuda:N")
