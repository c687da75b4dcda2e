"""Checks of config values that need no model: run before any heavy work, each failure one line."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from compress_order.errors import UserError


def resolve_device(name: str, key: str = "device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name} but CUDA is not available here; valid: auto, cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"{key}={name} is unknown; valid: auto, cpu, cuda, cuda:N")


def check_config(cfg: DictConfig) -> None:
    bits = cfg.bits
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise UserError(f"bits={bits} is outside 2-8 (an integer)")
    sp = cfg.sparsity
    if not isinstance(sp, (int, float)) or isinstance(sp, bool) or not 0 <= sp < 1:
        raise UserError(f"sparsity={sp} is outside [0, 1)")
    gs = cfg.group_size
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs <= 0 and gs != -1):
        raise UserError(f"group_size={gs} must be a positive integer or -1 (per-channel)")
    if not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed} must be an integer")
    from compress_order.backends import select_backends

    select_backends(cfg.eval.get("backends", "auto"), resolve_device(str(cfg.device)))
    if cfg.calibration.get("device"):
        resolve_device(str(cfg.calibration.device), "calibration.device")


def check_writable(path: str, what: str) -> None:
    """The folder (or its first existing ancestor, where it will be created) must be writable."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{path}' is not writable (checked {p}); choose another folder")
