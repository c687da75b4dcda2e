"""Activation quantization (`act_bits`): the inputs of every compressed layer fake-quantized, as W8A8/W4A8 kernels see them.

Symmetric integer grid with 2^(bits-1) - 1 positive levels, scale = max |x| / that:
- `token` (default): one dynamic scale per row of the layer's input (a token; for a convolution, a pixel's channels),
- `tensor`: one dynamic scale per input tensor,
- `static`: one fixed scale per layer, max |x| over the calibration samples (full-precision activations), observed
  again for every node before it is evaluated and before a calibrated stage reads statistics, since the
  weights upstream of each layer change from node to node.
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

from compress_order.batches import model_forward, to_device
from compress_order.errors import UserError
from compress_order.targets import Target

GRANULARITIES = ("token", "tensor", "static")
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
    # The granularity is checked with act_bits off too: a bad value must not run and be saved as the config.
    if granularity not in GRANULARITIES:
        raise UserError(f"act_granularity={granularity} is unknown; valid: {', '.join(GRANULARITIES)}")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16):
        raise UserError(f"act_bits={bits} is outside 2-16 (or null for full-precision activations)")


def fake_quant(x: Tensor, bits: int, granularity: str, channel_dim: int = -1, amax: Tensor | None = None) -> Tensor:
    """Round x onto a symmetric grid with a per-token (reduced over `channel_dim`) or per-tensor scale, or the
    fixed range `amax` (static; values beyond it are clipped)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax() if granularity != "token" else xf.abs().amax(dim=channel_dim, keepdim=True)
    scale = amax.to(xf.device).clamp_min(1e-12) / qmax
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)


class ActQuant:
    """Forward pre-hooks quantizing each target's first input."""

    def __init__(self, bits: int, granularity: str = "token"):
        check_act(bits, granularity)
        self.bits, self.granularity = int(bits), granularity
        self._last: tuple[Tensor, Tensor] | None = None  # (input, quantized): one tensor, one quantized tensor
        self.handles: list[RemovableHandle] = []
        self.ranges: dict[int, Tensor] = {}  # static: max |x| per layer (by module id), from `observe`
        self.modules: list[nn.Module] = []

    @property
    def static(self) -> bool:
        return self.granularity == "static"

    def _quant(self, x: Tensor, channel_dim: int, mod: nn.Module) -> Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        amax = self.ranges.get(id(mod)) if self.static else None
        if self.static and amax is None:
            raise RuntimeError(f"static activation ranges were not observed for {type(mod).__name__}")
        q = fake_quant(x, self.bits, self.granularity, channel_dim, amax)
        self._last = (x, q)
        return q

    @torch.no_grad()
    def observe(self, model: nn.Module, batches: list[Any]) -> None:
        """Static ranges: max |x| of every layer's input over `batches`, with full-precision activations."""
        if not self.static:
            return
        device = next(model.parameters()).device
        seen: dict[int, Tensor] = {}

        def hook(mod: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                a = args[0].detach().abs().amax().float()
                seen[id(mod)] = torch.maximum(seen[id(mod)], a) if id(mod) in seen else a

        handles = [m.register_forward_pre_hook(hook) for m in self.modules]
        try:
            with paused():
                for batch in batches:
                    model_forward(model, to_device(batch, device))
        finally:
            for h in handles:
                h.remove()
        self.ranges = seen
        self._last = None

    def install(self, targets: dict[str, Target]) -> "ActQuant":
        expert = next((t for t in targets.values() if t.index is not None), None)
        if expert is not None:  # a hook on the module would round its hidden states, never down_proj's input
            raise UserError(
                f"act_bits: quantizing the inputs of fused MoE experts ({type(expert.module).__name__}) is not "
                f"supported yet; run without act_bits, or leave the experts dense with "
                f"model.skip=[lm_head,'\\.(gate|router)$','experts']"
            )
        for t in targets.values():
            channel_dim = 1 if isinstance(t.module, nn.Conv2d) else -1
            self.modules.append(t.module)

            def hook(mod: nn.Module, args: tuple, kwargs: dict, cd: int = channel_dim) -> Any:
                if _pause[0] or not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                    return None
                return (self._quant(args[0], cd, mod), *args[1:]), kwargs

            # prepend: statistics hooks registered later (calibration) see what the layer computes with
            self.handles.append(t.module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.modules.clear()
        self._last = None

