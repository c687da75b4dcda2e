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

Fused MoE experts (one module, 3-D parameters): the hidden states entering the module are rounded as a linear
layer's input, and the gated intermediate entering each expert's down_proj with the same scheme (rows are that
expert's tokens; `tensor`: one scale per expert's batch), the module's call then computed expert by expert
(moe.routed_forward). Static ranges are not observed per expert, so `static` is refused there.

Floating-point activations (`act_format`, the formats' element codebooks from formats.py; act_bits follows it):
- `fp8`: E4M3 elements, x ≈ e4m3(x / s) · s with s = max |x| / 448 in float32: per token (dynamic, as FP8 W8A8
  kernels quantize their inputs), per tensor, or static per tensor (s fixed per layer from calibration);
- `nvfp4` (act_granularity `group`): E2M1 elements in groups of 16 consecutive input channels, each group's scale
  max |x_g| / 6 stored in E4M3 relative to a float32 scale per tensor, max |x| / (6 · 448), both from the input
  itself: the NVFP4 weight grid's scales (formats.group_scales) computed on activations.
Pairs with the weight format (`format`), as deployed recipes pair them: integer activations with integer weights
(W8A8, W4A8); FP8 activations with any weights (W8A8-FP8, and W4A8 with INT4, NVFP4 or MXFP4 weights, as
TensorRT-LLM serves them); NVFP4 activations with NVFP4 weights only (W4A4-NVFP4). Other pairs are refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from compress_order.core.errors import UserError
from compress_order.core.schemes import (
    FLOAT_FORMATS,
    NVFP4_GROUP,
    check_act,
)
from compress_order.modeling.batches import model_forward, to_device
from compress_order.modeling.moe import routed_forward
from compress_order.modeling.targets import Target
from compress_order.numerics.formats import E4M3_MAX, group_scales, round_to_codebook

_pause = [0]  # >0 while paused (see `paused`)


@contextmanager
def paused() -> Iterator[None]:
    """Full-precision inputs for the duration (e.g. while probing a transformation for exactness)."""
    _pause[0] += 1
    try:
        yield
    finally:
        _pause[0] -= 1


def act_scale(amax: Tensor, bits: int, fmt: str | None = None) -> Tensor:
    """The symmetric scale of inputs whose max |x| is `amax`: max |x| / 448 for FP8 (an all-zero input is exact at
    any scale: 1), max |x| / (2^(bits-1) - 1) for integers. A static checkpoint stores this as `input_scale`."""
    if fmt == "fp8":
        scale = amax / E4M3_MAX
        return torch.where(scale > 0, scale, torch.ones_like(scale))
    return amax.clamp_min(1e-12) / (2 ** (bits - 1) - 1)


def fake_quant(
    x: Tensor, bits: int, granularity: str, channel_dim: int = -1, amax: Tensor | None = None, fmt: str | None = None
) -> Tensor:
    """Round x onto a symmetric grid with a per-token (reduced over `channel_dim`) or per-tensor scale, or the
    fixed range `amax` (static; values beyond it are clipped). `fmt`: a float format's codebook instead of the
    integer grid (fp8: E4M3 with the same scales; nvfp4: groups of 16 along `channel_dim`)."""
    if fmt == "nvfp4":
        return _nvfp4(x, channel_dim)
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax() if granularity != "token" else xf.abs().amax(dim=channel_dim, keepdim=True)
    scale = act_scale(amax.to(xf.device), bits, fmt)
    if fmt == "fp8":
        return (round_to_codebook(xf / scale, 8) * scale).to(x.dtype)  # saturates at ±448 · s
    qmax = 2 ** (bits - 1) - 1
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)


def _nvfp4(x: Tensor, channel_dim: int) -> Tensor:
    """x in NVFP4: E2M1 values in groups of 16 channels, the groups' E4M3 scales relative to one float32 scale
    from max |x| (formats.group_scales, as an NVFP4 weight grid is scaled)."""
    xf = x.float().movedim(channel_dim, -1)
    groups = xf.reshape(*xf.shape[:-1], xf.shape[-1] // NVFP4_GROUP, NVFP4_GROUP)
    scale, _ = group_scales(groups.abs().amax(-1, keepdim=True), FLOAT_FORMATS["nvfp4"], xf.abs().amax())
    q = round_to_codebook(groups / scale, 4) * scale
    return q.reshape(xf.shape).movedim(-1, channel_dim).to(x.dtype)


class ActQuant:
    """Forward pre-hooks quantizing each target's first input."""

    def __init__(self, bits: int, granularity: str = "token", fmt: str | None = None):
        check_act(bits, granularity, fmt, weight_format=None)  # the pairing with the weights: the config's check
        self.bits, self.granularity, self.fmt = int(bits), granularity, fmt
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
        q = fake_quant(x, self.bits, self.granularity, channel_dim, amax, self.fmt)
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

    def input_scales(self, targets: dict[str, Target]) -> dict[str, Tensor]:
        """Static: each target's observed input scale (one per tensor), by layer name, as a checkpoint stores it."""
        if not self.static:
            return {}
        missing = [n for n, t in targets.items() if id(t.module) not in self.ranges]
        if missing:
            raise RuntimeError(f"static activation ranges were not observed for {missing[0]}")
        return {n: act_scale(self.ranges[id(t.module)], self.bits, self.fmt).reshape(1) for n, t in targets.items()}

    def install(self, targets: dict[str, Target]) -> "ActQuant":
        experts = {id(t.module): t.module for t in targets.values() if t.index is not None}
        if experts and self.static:  # one observed range per module would mix every expert's down_proj input
            kind = type(next(iter(experts.values()))).__name__
            raise UserError(
                f"act_granularity=static: the inputs of fused MoE experts ({kind}) "
                f"take dynamic scales only (token or tensor); or leave the experts dense with "
                f"model.skip=[lm_head,'\\.(gate|router)$','experts']"
            )
        if self.fmt == "nvfp4":
            bad = next((t for t in targets.values() if _channels(t) % NVFP4_GROUP), None)
            if bad is not None:
                raise UserError(
                    f"act_format=nvfp4 quantizes inputs in groups of {NVFP4_GROUP} channels; the "
                    f"{_channels(bad)} input channels of {bad.name} are not a multiple of it (leave it "
                    f"dense with model.skip, or use act_format=fp8)"
                )
        for module in experts.values():
            self._install_experts(module)
        for t in {id(t.module): t for t in targets.values()}.values():  # an experts module once
            channel_dim = 1 if isinstance(t.module, nn.Conv2d) else -1
            self.modules.append(t.module)

            def hook(mod: nn.Module, args: tuple, kwargs: dict, cd: int = channel_dim) -> Any:
                if _pause[0] or not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                    return None
                return (self._quant(args[0], cd, mod), *args[1:]), kwargs

            # prepend: statistics hooks registered later (calibration) see what the layer computes with
            self.handles.append(t.module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        return self

    def _install_experts(self, module: nn.Module) -> None:
        """down_proj's input rounded inside moe.intermediate, and the module's call computed through it."""

        def quant(h: Tensor) -> Tensor:
            return h if _pause[0] else fake_quant(h, self.bits, self.granularity, -1, None, self.fmt)

        def forward(*args: Any, **kwargs: Any) -> Tensor:
            return type(module).forward(module, *args, **kwargs) if _pause[0] else routed_forward(module, args, kwargs)

        module.act_quant, module.forward = quant, forward
        self.handles.append(_Restore(module, ("act_quant", "forward")))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.modules.clear()
        self._last = None


def _channels(t: Target) -> int:
    """The channels of a layer's input (a convolution's input channels; a linear layer's input features)."""
    return int(getattr(t.module, "in_channels", t.shape[1]))


class _Restore:
    """A handle removing instance attributes set over a module's own (its class's forward comes back)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        self.module, self.names = module, names

    def remove(self) -> None:
        for n in self.names:
            self.module.__dict__.pop(n, None)
