"""Activation quantization (`act_bits`): the inputs of every compressed layer fake-quantized, as W8A8/W4A8 kernels see them.

Symmetric integer grid with 2^(bits-1) - 1 positive levels, scale = max |x| / that:
- `token` (default): one dynamic scale per row of the layer's input (a token; for a convolution, a pixel's channels),
- `tensor`: one dynamic scale per input tensor.
The hooks stay on the model for the whole run, so every evaluation and the calibration of every later stage
see quantized inputs. Layers fed the same tensor (q/k/v) receive the same quantized tensor object, so the
calibration driver still groups them by identity.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from compress_order.errors import UserError
from compress_order.targets import Target

GRANULARITIES = ("token", "tensor")
_pause = [0]  # >0 while paused (see `paused`)


@contextmanager
def paused() -> Iterator[None]:
    """Full-precision inputs for the duration (e.g. while probing a transformation for exactness)."""
    _pause[0] += 1
    try:
        yield
    finally:
        _pause[0] -= 1


def check_act(bits: Any, granularity: Any) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise UserError(f"act_bits={bits} is outside 2-16 (or null for full-precision activations)")
    if granularity not in GRANULARITIES:
        raise UserError(f"act_granularity={granularity} is unknown; valid: {', '.join(GRANULARITIES)}")


def fake_quant(x: Tensor, bits: int, granularity: str, channel_dim: int = -1) -> Tensor:
    """Round x onto a symmetric grid with a per-token (reduced over `channel_dim`) or per-tensor scale."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    amax = xf.abs().amax() if granularity == "tensor" else xf.abs().amax(dim=channel_dim, keepdim=True)
    scale = amax.clamp_min(1e-12) / qmax
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)


class ActQuant:
    """Forward pre-hooks quantizing each target's first input."""

    def __init__(self, bits: int, granularity: str = "token"):
        check_act(bits, granularity)
        self.bits, self.granularity = int(bits), granularity
        self._last: tuple[Tensor, Tensor] | None = None  # (input, quantized): one tensor, one quantized tensor
        self.handles: list[RemovableHandle] = []

    def _quant(self, x: Tensor, channel_dim: int) -> Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        q = fake_quant(x, self.bits, self.granularity, channel_dim)
        self._last = (x, q)
        return q

    def install(self, targets: dict[str, Target]) -> "ActQuant":
        for t in targets.values():
            channel_dim = 1 if isinstance(t.module, nn.Conv2d) else -1

            def hook(mod: nn.Module, args: tuple, kwargs: dict, cd: int = channel_dim) -> Any:
                if _pause[0] or not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                    return None
                return (self._quant(args[0], cd), *args[1:]), kwargs

            # prepend: statistics hooks registered later (calibration) see what the layer computes with
            self.handles.append(t.module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._last = None

    def describe(self) -> str:
        return f"A{self.bits} ({self.granularity}-wise dynamic, symmetric)"
