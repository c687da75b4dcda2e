"""Deployable forms of a compressed model, for latency that means something.

The evaluated model keeps compressed weights in dense tensors (`dense-simulated`): right for accuracy, silent
about speed. A backend converts a copy into a real packed format with a real kernel and is timed beside the
dense baseline of the same run. A node whose format a backend cannot serve gets an `n/a` row with the reason;
a simulated time is never reported as a speed-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compress_order.errors import UserError, choices
from compress_order.targets import Target, as_linear

SIMULATED = "dense-simulated"


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]  # device types with a kernel
    description: str
    fits: Callable[[dict[str, Target]], str | None]  # why this node's format cannot be served, or None
    convert: Callable[[nn.Module, dict[str, Target], torch.device], nn.Module]


def _linear_only(targets: dict[str, Target], what: str) -> str | None:
    """These kernels replace nn.Linear weights: a layer that computes a Linear (GPT-2's transposed Conv1D) is
    served as one (`_packable`), any other (Conv2d) has no kernel."""
    other = next((t for t in targets.values() if not t.adapter.linear), None)
    if other is None:
        return None
    return f"{what} kernels exist for Linear layers only; {other.name} is {type(other.module).__name__}"


def _packable(model: nn.Module, targets: dict[str, Target]) -> nn.Module:
    """A copy of the model to pack, its target layers as nn.Linear (the layout the kernels take)."""
    packed = copy.deepcopy(model)
    for name in targets:
        mod = packed.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            packed.set_submodule(name, as_linear(mod))
    return packed


def _grids(targets: dict[str, Target], max_bits: int) -> str | None:
    why = _linear_only(targets, "torchao weight-only")
    if why:
        return why
    bits = {t.constraint.grid.bits if t.constraint.grid is not None else None for t in targets.values()}
    if None in bits:
        return "weights are not quantized"
    if max(bits) > max_bits:
        return f"{max(bits)}-bit weights do not fit a {max_bits}-bit kernel"
    return None


def _only(targets: dict[str, Target]) -> Callable[[nn.Module, str], bool]:
    names = set(targets)
    return lambda mod, fqn: fqn in names


def _int8_weight_only(model: nn.Module, targets: dict[str, Target], device: torch.device) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    packed = _packable(model, targets)
    quantize_(packed, Int8WeightOnlyConfig(), filter_fn=_only(targets))
    return packed


def _int4_weight_only(model: nn.Module, targets: dict[str, Target], device: torch.device) -> nn.Module:
    from torchao.quantization import quantize_

    gs = next(iter(targets.values())).constraint.grid.group_size
    packed = _packable(model, targets)
    if device.type == "cuda":  # tinygemm-style tile-packed int4, bf16 activations
        from torchao.quantization import Int4WeightOnlyConfig

        packed = packed.to(torch.bfloat16)
        quantize_(packed, Int4WeightOnlyConfig(group_size=gs, int4_packing_format="tile_packed_to_4d"),
                  filter_fn=_only(targets))  # fmt: skip
    else:
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup

        quantize_(packed, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(gs),
                                               mapping_type=MappingType.ASYMMETRIC), filter_fn=_only(targets))  # fmt: skip
    return packed


def _int4_fits(targets: dict[str, Target]) -> str | None:
    why = _grids(targets, 4)
    if why:
        return why
    sizes = {t.constraint.grid.group_size for t in targets.values()}
    if len(sizes) > 1 or any(t.constraint.grid.group_size == t.shape[1] for t in targets.values()):
        return "the int4 kernel needs one group size smaller than every layer's inputs"
    return None


def _semi_structured_fits(targets: dict[str, Target]) -> str | None:
    if any(t.constraint.nm != (2, 4) for t in targets.values()):
        return "weights are not 2:4 sparse"
    return _linear_only(targets, "2:4")


def _semi_structured(model: nn.Module, targets: dict[str, Target], device: torch.device) -> nn.Module:
    from torch.sparse import to_sparse_semi_structured

    packed = _packable(model, targets).to(torch.float16)
    mods = dict(packed.named_modules())
    for name in targets:
        lin = mods[name]
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.data), requires_grad=False)
    return packed


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend("int8_weight_only", ("cpu", "cuda"), "torchao int8 weight-only matmul", lambda t: _grids(t, 8),
                _int8_weight_only),
        Backend("int4_weight_only", ("cpu", "cuda"), "torchao int4 weight-only (intx on CPU, tile-packed on CUDA)",
                _int4_fits, _int4_weight_only),
        Backend("sparse_2_4", ("cuda",), "2:4 semi-structured sparse matmul (torch.sparse)", _semi_structured_fits,
                _semi_structured),
    ]
}  # fmt: skip


def select_backends(requested: str | list[str] | None, device: torch.device) -> list[Backend]:
    """`auto`: every backend with a kernel on this device; a list: each must run here (else UserError)."""
    if requested in (None, "none", []):
        return []
    if requested == "auto":
        return [b for b in BACKENDS.values() if device.type in b.devices]
    names = [requested] if isinstance(requested, str) else list(requested)
    here = [b.name for b in BACKENDS.values() if device.type in b.devices]
    out = []
    for name in names:
        if name not in BACKENDS:
            raise UserError(f"unknown backend '{name}'; valid: {choices(BACKENDS)}, auto, none")
        if device.type not in BACKENDS[name].devices:
            raise UserError(f"backend '{name}' cannot run on {device.type}; supported on {device.type}: {choices(here)}")
        out.append(BACKENDS[name])
    return out
