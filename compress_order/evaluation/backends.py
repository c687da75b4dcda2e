"""Deployable forms of a compressed model, for latency that means something.

The evaluated model keeps compressed weights in dense tensors (`dense-simulated`): right for accuracy, silent
about speed. A backend packs a copy into a real format with a real kernel: the node's OWN integer codes, scales and
zero-points (its grids: w = (code - zero)·scale per (row, group), compress_order/numerics/quant.py), never a refit, so the
timed model computes what was evaluated, up to the kernel's arithmetic. A node whose grid a kernel cannot take
gets an `n/a` row with the reason; a simulated time is never reported as a speed-up.

Each kernel computes in one activation dtype (`act_dtype`): its rows are labelled `<backend>(<dtype>)`, e.g.
`int4_weight_only(bf16)`, and its speed-up is against the dense model of the same node in that dtype: the
evaluated model itself (`dense-simulated`) when the dtypes agree, else a copy cast to it, timed beside the packed
one and written as backend `dense(<dtype>)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from compress_order.core.errors import InvariantError, UserError, choices
from compress_order.core.registry import Registry
from compress_order.core.schema import DENSE_REFERENCE
from compress_order.evaluation.backend_table import BACKEND_TABLE
from compress_order.modeling.targets import Target, as_linear
from compress_order.numerics.quant import QuantGrid

if TYPE_CHECKING:
    from compress_order.evaluation.tasks import Task

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TINYGEMM_GROUPS = (256, 128, 64, 32)  # group sizes the int4 tinygemm kernels take (CPU and CUDA)
# Why no backend times the float formats (torch 2.14, torchao 0.18): every backend here computes what was evaluated
# (16/32-bit activations), and the float kernels that exist either quantize the activations too or dequantize.
# scripts/gpu_checks.py (float_kernels) runs the CUDA ones.
FLOAT_KERNELS = {
    "fp8": "fp8: torch._scaled_mm (CPU and CUDA) multiplies FP8 activations by FP8 weights, which this node was not "
    "evaluated with, and torchao's weight-only Float8Tensor dequantizes before a dense matmul",
    "nvfp4": "nvfp4: torchao's NVFP4Tensor multiplies with torch._scaled_mm on CUDA SM 10.0+ only (FP4 activations) "
    "and dequantizes elsewhere",
    "mxfp4": "mxfp4: torchao's MXTensor multiplies with torch._scaled_mm on CUDA SM 10.0+ only (FP4 activations) "
    "and dequantizes elsewhere",
}


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]  # device types with a kernel
    description: str
    fits: Callable[[dict[str, Target]], str | None]  # why this node's format cannot be served, or None
    convert: Callable[[nn.Module, dict[str, Target], torch.device], nn.Module]
    act_dtype: Callable[[torch.dtype, torch.device], torch.dtype]  # the kernel's activations, given the model's dtype

    def label(self, model_dtype: torch.dtype, device: torch.device) -> str:
        """The backend name of its result rows: the kernel and the dtype it computes (and is compared) in."""
        return f"{self.name}({dtype_name(self.act_dtype(model_dtype, device))})"


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def model_dtype(targets: dict[str, Target]) -> torch.dtype:
    return next(iter(targets.values())).dtype


def _same(model: torch.dtype, device: torch.device) -> torch.dtype:
    return model


def _linear_only(targets: dict[str, Target], what: str) -> str | None:
    """These kernels replace nn.Linear weights: a layer that computes a Linear (GPT-2's transposed Conv1D) is
    served as one (`_packable`), any other (Conv2d) has no kernel."""
    other = next((t for t in targets.values() if not t.adapter.linear), None)
    if other is None:
        return None
    return f"{what} kernels exist for Linear layers only; {other.name} is {type(other.module).__name__}"


def _packable(model: nn.Module, targets: dict[str, Target], dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of the model to pack, its target layers as nn.Linear (the layout the kernels take), in `dtype`."""
    packed = copy.deepcopy(model)
    if dtype is not None:
        packed = packed.to(dtype)
    for name in targets:
        mod = packed.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            packed.set_submodule(name, as_linear(mod))
    return packed


def _set_weight(packed: nn.Module, name: str, weight: Tensor) -> None:
    packed.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)


@torch.no_grad()
def own_codes(t: Target) -> tuple[Tensor, QuantGrid]:
    """The unsigned integer codes (int32, (rows, cols)) of the evaluated weight on its own grid, checked to give
    that weight back exactly; and the grid, on the weight's device."""
    w = t.weight
    grid = t.constraint.grid.to(w.device)
    codes = grid.codes(w)
    if not torch.equal(grid.dequant(codes, w.dtype), w):  # the runner's invariant check guarantees this
        raise InvariantError(f"layer {t.name}: its integer codes do not reproduce the evaluated weight")
    return codes.to(torch.int32), grid


def _grids(targets: dict[str, Target], max_bits: int) -> str | None:
    why = _linear_only(targets, "torchao weight-only")
    if why:
        return why
    bits = {t.constraint.grid.bits if t.constraint.grid is not None else None for t in targets.values()}
    if None in bits:
        return "weights are not quantized"
    fmts = sorted({t.constraint.grid.fmt for t in targets.values()} - {"int"})
    if fmts:
        return (
            f"these kernels take integer grids; {', '.join(fmts)} weights have no kernel in this backend "
            f"({'; '.join(FLOAT_KERNELS[f] for f in fmts)})"
        )
    if max(bits) > max_bits:
        return f"{max(bits)}-bit weights do not fit a {max_bits}-bit kernel"
    return None


# ---------------------------------------------------------------------------------------------------- int8


def _int8_codes(grid: QuantGrid) -> str:
    """How a grid goes into int8: `centred` stores code - zero (zero-point 0): exact when it spans at most int8,
    i.e. up to 7 bits, or 8 bits with the symmetric zero 128; `offset` stores code - 128 with zero - 128 as the
    zero-point, which only the per-group (dequantizing) path applies; `none`: neither fits."""
    if grid.bits <= 7 or bool((grid.zero == 128).all()):
        return "centred"
    return "offset" if grid.n_groups > 1 else "none"


def _int8_fits(targets: dict[str, Target]) -> str | None:
    why = _grids(targets, 8)
    if why:
        return why
    bad = next((t for t in targets.values() if _int8_codes(t.constraint.grid) == "none"), None)
    if bad is not None:
        return (
            f"{bad.name}: an 8-bit per-channel grid with zero-points other than 128 spans more than int8, and the "
            f"int8 per-channel kernel takes no zero-point"
        )
    return None


def _int8_weight_only(model: nn.Module, targets: dict[str, Target], device: torch.device) -> nn.Module:
    """torchao's Int8Tensor from the node's codes: per channel, x @ int8ᵀ · scale (its weight-only int8 matmul);
    per group, the int8 codes dequantized with their own scales and zero-points, then a matmul."""
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    packed = _packable(model, targets)
    for name, t in targets.items():
        codes, grid = own_codes(t)
        if _int8_codes(grid) == "centred":
            qdata, zero = codes - grid.zero.repeat_interleave(grid.group_size, 1).to(torch.int32), None
        else:
            qdata, zero = codes - 128, (grid.zero - 128).to(torch.int8)
        dtype = t.weight.dtype
        _set_weight(
            packed,
            name,
            Int8Tensor(qdata.to(torch.int8), grid.scale.to(dtype), [1, grid.group_size], dtype, zero_point=zero),
        )
    return packed


# ---------------------------------------------------------------------------------------------------- int4


def _tinygemm_group(group_size: int) -> int | None:
    """The kernel group a grid's groups split into (a per-channel or 512-wide grid repeats its scale over
    several kernel groups), or None when none divides it."""
    return next((g for g in TINYGEMM_GROUPS if group_size % g == 0), None)


def _tinygemm_qparams(codes: Tensor, grid: QuantGrid, dtype: torch.dtype) -> tuple[int, Tensor, Tensor, Tensor]:
    """tinygemm computes w = (q - 8)·scale + zero with a float zero: our (q - z)·s is that with zero = (8 - z)·s.
    Narrower codes are first shifted up by an integer c per group (q + c, z + c: the same weights), as far as
    [0, 15] allows towards z + c = 8, where the float zero is exactly 0: a 2- or 3-bit grid then loses nothing to
    the zero's rounding in bf16 (a 2-bit per-channel grid's logits were 3x further off without it).
    Returns the kernel group size, the codes (int32) and the scales and float zeros, (rows, kernel groups), in
    `dtype`."""
    g = _tinygemm_group(grid.group_size)
    assert g is not None
    shift = torch.clamp(8 - grid.zero, 0, 15 - grid.maxq)
    codes = codes + shift.repeat_interleave(grid.group_size, 1).to(torch.int32)
    rep = grid.group_size // g
    scale, zero = grid.scale.repeat_interleave(rep, 1), (grid.zero + shift).repeat_interleave(rep, 1)
    return g, codes, scale.to(dtype), ((8 - zero) * scale).to(dtype)


def _int4_act(model: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16: CUDA tinygemm takes nothing else, and the CPU kernel has a fast path only for bf16 (in float32 and
    float16 it was 100x slower than a dense matmul here)."""
    return torch.bfloat16


def _int4_fits(targets: dict[str, Target]) -> str | None:
    why = _grids(targets, 4)
    if why:
        return why
    for t in targets.values():
        gs = t.constraint.grid.group_size
        if _tinygemm_group(gs) is None:
            what = "per-channel grid over" if gs == t.shape[1] else "group size"
            return (
                f"{t.name}: {what} {gs}: the int4 kernel takes groups of "
                f"{', '.join(map(str, TINYGEMM_GROUPS[::-1]))} (or a multiple)"
            )
    return None


def _int4_weight_only(model: nn.Module, targets: dict[str, Target], device: torch.device) -> nn.Module:
    """The node's codes (2-, 3- and 4-bit codes all lie in [0, 15]) packed for the int4 tinygemm kernel: on CPU
    torchao's Int4OpaqueTensor (`_weight_int4pack_mm_for_cpu`), on CUDA its Int4TilePackedTo4dTensor
    (`_weight_int4pack_mm`); bf16 activations, scales and zeros on both."""
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    act = _int4_act(model_dtype(targets), device)
    packed = _packable(model, targets, act)
    for name, t in targets.items():
        g, codes, scale, zero = _tinygemm_qparams(*own_codes(t), act)
        rows, cols = codes.shape
        if device.type == "cuda":
            from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
                Int4TilePackedTo4dTensor,
            )

            # The tile layout wants inputs padded to 1024 and outputs to 8: padded codes meet zero activations
            # (the kernel pads x with zeros) or are sliced off, so their value is immaterial.
            pc, pr = -cols % 1024, -rows % 8
            q = nn.functional.pad(codes, (0, pc, 0, pr)).to(torch.uint8)
            scale = nn.functional.pad(scale, (0, pc // g, 0, pr), value=1.0)
            zero = nn.functional.pad(zero, (0, pc // g, 0, pr))
            qdata = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
            sz = pack_tinygemm_scales_and_zeros(scale, zero, act)
            weight = Int4TilePackedTo4dTensor(qdata, sz, [1, g], torch.Size([rows, cols]))
        else:
            from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

            qdata = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            sz = pack_tinygemm_scales_and_zeros(scale, zero, act)
            weight = Int4OpaqueTensor(qdata, sz, [1, g], torch.Size([rows, cols]))
        _set_weight(packed, name, weight)
    return packed


# ---------------------------------------------------------------------------------------------------- 2:4


def _half_act(model: torch.dtype, device: torch.device) -> torch.dtype:
    return model if model in (torch.float16, torch.bfloat16) else torch.float16


def _semi_structured_fits(targets: dict[str, Target]) -> str | None:
    if any(t.constraint.nm != (2, 4) for t in targets.values()):
        return "weights are not 2:4 sparse"
    return _linear_only(targets, "2:4")


def _semi_structured(model: nn.Module, targets: dict[str, Target], device: torch.device) -> nn.Module:
    """The node's own weights (kept values, its 2:4 mask) compressed by torch.sparse in fp16 (bf16 for a bf16
    model): a grid's values are held in that dtype, the kernel's only rounding of the weights."""
    from torch.sparse import to_sparse_semi_structured

    act = _half_act(model_dtype(targets), device)
    packed = _packable(model, targets, act)
    for name, t in targets.items():
        _set_weight(packed, name, to_sparse_semi_structured(t.weight.to(act).contiguous()))
    return packed


BACKENDS: Registry[Backend] = Registry("backend", also=("auto", "none"))
KERNELS = {  # name -> (fits, convert, act_dtype); devices and description in backend_table.py
    "int8_weight_only": (_int8_fits, _int8_weight_only, _same),
    "int4_weight_only": (_int4_fits, _int4_weight_only, _int4_act),
    "sparse_2_4": (_semi_structured_fits, _semi_structured, _half_act),
}
for _name, (_devices, _description) in BACKEND_TABLE.items():
    BACKENDS.register(_name, Backend(_name, _devices, _description, *KERNELS[_name]))


def latency_entries(
    backends: list[Backend], model: nn.Module, targets: dict[str, Target], task: "Task", device: torch.device
) -> list[dict]:
    """Latency of each backend on a packed copy of the node, or n/a with the reason; and, for each activation
    dtype other than the model's, the dense node cast to it (backend `dense(<dtype>)`), the speed-up's reference."""
    out: list[dict] = []
    if not backends or not targets:
        return out
    here = model_dtype(targets)
    references: set[torch.dtype] = set()
    for b in backends:
        act, label = b.act_dtype(here, device), b.label(here, device)
        why = b.fits(targets)
        if why is None:
            try:
                packed = b.convert(model, targets, device)
                out += [{"metric": m, "value": v, "backend": label} for m, v in task.latency(packed).items()]
                del packed
                if act != here and act not in references:  # timed right after the packed copy, same shapes
                    dense = copy.deepcopy(model).to(act)
                    out += [
                        {"metric": m, "value": v, "backend": f"{DENSE_REFERENCE}{dtype_name(act)})"}
                        for m, v in task.latency(dense).items()
                    ]
                    references.add(act)
                    del dense
                continue
            except InvariantError:
                raise
            except (RuntimeError, NotImplementedError, ImportError, AssertionError) as e:  # no kernel at run time
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        out.append({"metric": "latency_ms", "value": float("nan"), "backend": label, "status": "n/a", "error": why})
    return out


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
        backend = BACKENDS.lookup(name)
        if device.type not in backend.devices:
            raise UserError(
                f"backend '{name}' cannot run on {device.type}; supported on {device.type}: {choices(here)}"
            )
        out.append(backend)
    return out
