"""A node's quantized weights as a compressed-tensors `pack-quantized` checkpoint, from the node's own grids.

Nothing is refit: each layer's integer codes are computed from its evaluated weight and the grid that put it there,
checked to reproduce that weight bit for bit, and handed with the grid's scales and zero-points to
compressed-tensors' own pack-quantized compressor; the config is built from its QuantizationConfig classes.

Conventions. Ours: w = (q - z)·s with unsigned codes q and integer zero-points z in [0, 2^b - 1] (compress_order/numerics/quant.py).
compressed-tensors: w = (q' - z')·s with signed q', z' in [-2^(b-1), 2^(b-1) - 1] and no zero-point when symmetric.
So q' = q - 2^(b-1) and z' = z - 2^(b-1): a symmetric grid has z = 2^(b-1), i.e. z' = 0. Loaders hold scales in
the model's dtype, so a float16/bfloat16 model reloads bit for bit only where its float32 scales survive that cast;
`exact` in the sidecar says whether they do.

Activations: a run with `act_bits` computed with its layers' inputs fake-quantized (compress_order/modeling/act.py: symmetric,
dynamic, per token or per tensor); each config group then carries that scheme as its `input_activations`, and the
checkpoint is `int-quantized` (one int8 per code, the format compressed-tensors gives integer weights with
quantized activations), because vLLM picks its int8-activation kernels (W8A8, W4A8) only for that format and serves
pack-quantized only without activation quantization (WNA16).

Float grids (compress_order/numerics/formats.py) are written in compressed-tensors' own float formats, from their codes:
  fp8    float-quantized: one float8_e4m3fn per weight, `weight_scale` per channel or per group of 128 (in the
         model's dtype, as loaders hold it, like the integer scales above).
  nvfp4  nvfp4-pack-quantized: E2M1 nibbles two per byte (even column in the low nibble), group 16, E4M3
         `weight_scale` and one float32 `weight_global_scale` per tensor; a group's scale is
         weight_scale / weight_global_scale (the global scale is the reciprocal of our per-tensor scale).
  mxfp4  mxfp4-pack-quantized: E2M1 nibbles, group 32, uint8 `weight_scale` holding the E8M0 exponent + 127.
compressed-tensors 0.20 decompresses both FP4 formats into bfloat16: MXFP4 weights (E2M1 value times a power of two)
fit bfloat16 exactly, NVFP4 weights in general do not (their group scales are E4M3 over a float32), so a float32
model's NVFP4 checkpoint reads back rounded to bfloat16; `mismatched_weights` counts what that changes.

Act-order: GPTQ here keeps groups in the original column order (act_order needs static groups), so its grids
need no group index (`weight_g_idx`); compressed-tensors 0.20 has dropped the dynamic (`group`) act-order anyway.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
)
from torch import Tensor, nn

from compress_order.core.errors import InvariantError, UserError
from compress_order.modeling.targets import Target
from compress_order.numerics.formats import FloatGrid, codebook, nvfp4_global_scale
from compress_order.numerics.quant import QuantGrid

FORMAT = CompressionFormat.pack_quantized.value
ACT_FORMAT = CompressionFormat.int_quantized.value  # weights with quantized input activations


@dataclass(frozen=True)
class ActScheme:
    """The input activations of a run with `act_bits`: symmetric, one dynamic scale per token or per tensor, or one
    static scale per layer (observed on calibration data, stored as each layer's `input_scale`); integer, or FP8
    E4M3 (`act_format=fp8`)."""

    bits: int
    granularity: str  # "token", "tensor" or "static" (compress_order/modeling/act.py)
    fmt: str | None = None  # None: integer; "fp8"

    @property
    def static(self) -> bool:
        return self.granularity == "static"

    def args(self) -> QuantizationArgs:
        strategy = QuantizationStrategy.TOKEN if self.granularity == "token" else QuantizationStrategy.TENSOR
        kind = "int" if self.fmt is None else "float"
        return QuantizationArgs(
            num_bits=self.bits, type=kind, symmetric=True, dynamic=not self.static, strategy=strategy
        )

    def describe(self) -> str:
        kind = "" if self.fmt is None else " FP8 E4M3"
        how = "static per-tensor" if self.static else f"{self.granularity}-wise dynamic"
        return f"A{self.bits}{kind} {how} symmetric"

    def input_tensors(self, name: str, scale: Tensor | None) -> dict[str, Tensor]:
        """A static scheme's per-layer tensors (its scale in float32, as the run applied it, and an integer
        scheme's zero-point, 0): none if dynamic."""
        if not self.static:
            return {}
        if scale is None:
            raise InvariantError(f"layer {name}: static activations without an observed input scale")
        out = {"input_scale": scale.reshape(1).float().cpu()}
        if self.fmt is None:
            out["input_zero_point"] = torch.zeros(1, dtype=torch.int8)
        return out


@dataclass(frozen=True)
class WeightScheme:
    """One config group: bits, group size (-1: one group per output channel), symmetry, and the input activations'
    scheme where the run quantized them."""

    bits: int
    group_size: int
    sym: bool
    act: ActScheme | None = None

    @property
    def format(self) -> str:
        return FORMAT if self.act is None else ACT_FORMAT

    def scheme(self, targets: list[str]) -> QuantizationScheme:
        inputs = None if self.act is None else self.act.args()
        return QuantizationScheme(targets=targets, weights=self.args(), input_activations=inputs, format=self.format)

    def args(self) -> QuantizationArgs:
        strategy = QuantizationStrategy.CHANNEL if self.group_size == -1 else QuantizationStrategy.GROUP
        return QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.sym,
            strategy=strategy,
            group_size=None if self.group_size == -1 else self.group_size,
        )

    def describe(self) -> str:
        groups = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        acts = "" if self.act is None else f", {self.act.describe()} activations"
        return f"{self.bits}-bit {groups} {'symmetric' if self.sym else 'with zero-points'}{acts}"


# compressed-tensors' format for each float grid's weights, and how its scales are stored
FLOAT_FORMAT = {
    "fp8": CompressionFormat.float_quantized.value,
    "nvfp4": CompressionFormat.nvfp4_pack_quantized.value,
    "mxfp4": CompressionFormat.mxfp4_pack_quantized.value,
}


@dataclass(frozen=True)
class FloatScheme:
    """One config group of float weights: the format, its group (-1: per channel; FP8 only) and the input
    activations' scheme where the run quantized them. Float grids are symmetric: no zero-points."""

    fmt: str  # fp8 | nvfp4 | mxfp4
    group_size: int
    act: ActScheme | None = None
    sym = True

    @property
    def bits(self) -> int:
        return 8 if self.fmt == "fp8" else 4

    @property
    def format(self) -> str:
        return FLOAT_FORMAT[self.fmt]

    def scheme(self, targets: list[str]) -> QuantizationScheme:
        inputs = None if self.act is None else self.act.args()
        return QuantizationScheme(targets=targets, weights=self.args(), input_activations=inputs, format=self.format)

    def args(self) -> QuantizationArgs:
        if self.fmt == "fp8":
            strategy = QuantizationStrategy.CHANNEL if self.group_size == -1 else QuantizationStrategy.GROUP
            return QuantizationArgs(
                num_bits=8,
                type="float",
                symmetric=True,
                strategy=strategy,
                group_size=None if self.group_size == -1 else self.group_size,
            )
        if self.fmt == "nvfp4":  # groups plus a per-tensor global scale: compressed-tensors' TENSOR_GROUP
            strategy = QuantizationStrategy.TENSOR_GROUP
            return QuantizationArgs(
                num_bits=4,
                type="float",
                symmetric=True,
                group_size=16,
                strategy=strategy,
                scale_dtype=torch.float8_e4m3fn,
            )
        return QuantizationArgs(
            num_bits=4,
            type="float",
            symmetric=True,
            group_size=32,
            strategy=QuantizationStrategy.GROUP,
            scale_dtype=torch.uint8,
        )

    def describe(self) -> str:
        acts = "" if self.act is None else f", {self.act.describe()} activations"
        if self.fmt == "fp8":
            groups = "per channel" if self.group_size == -1 else f"group {self.group_size}"
            return f"FP8 E4M3 {groups}{acts}"
        if self.fmt == "nvfp4":
            return f"NVFP4 E2M1 group 16, E4M3 scales and a float32 global scale{acts}"
        return f"MXFP4 E2M1 group 32, E8M0 scales{acts}"


def weight_scheme(grid: QuantGrid | FloatGrid, act: ActScheme | None = None) -> WeightScheme | FloatScheme:
    """The scheme a grid is written under. A symmetric grid whose zero-points are not all the midpoint (none is
    made so, but a grid is only data) is written with its zero-points."""
    if isinstance(grid, FloatGrid):  # FP4 formats fix their group; FP8's one group per row is per channel
        fixed = grid.format.group_size
        return FloatScheme(grid.fmt, fixed or (-1 if grid.n_groups == 1 else grid.group_size), act)
    mid = 2 ** (grid.bits - 1)
    sym = grid.sym and bool((grid.zero == mid).all())
    return WeightScheme(grid.bits, -1 if grid.n_groups == 1 else grid.group_size, sym, act)


@dataclass
class PackedLayer:
    scheme: WeightScheme | FloatScheme
    tensors: dict[str, Tensor]  # local names: weight_packed, weight_scale, weight_shape (and weight_zero_point);
    # int-quantized: weight (int8 codes), weight_scale (and weight_zero_point); float-quantized: weight (float8),
    # weight_scale; nvfp4 / mxfp4: weight_packed (uint8), weight_scale (and nvfp4's weight_global_scale)
    mismatched: int  # weights the loader's arithmetic (scales in the model dtype) does not give back exactly


@torch.no_grad()
def pack_layer(target: Target, act: ActScheme | None = None, input_scale: Tensor | None = None) -> PackedLayer:
    """Codes of the evaluated weight on its own grid, packed by compressed-tensors' pack-quantized compressor (or,
    with quantized activations, stored one int8 per code by its int-quantized compressor), with the layer's static
    input scale where the activations have one."""
    layer = _pack_weight(target, act)
    if act is not None:
        layer.tensors.update(act.input_tensors(target.name, input_scale))
    return layer


def _pack_weight(target: Target, act: ActScheme | None) -> PackedLayer:
    grid, module = target.constraint.grid, target.module
    if grid is None:
        raise ValueError(f"{target.name} has no quantization grid")
    if not isinstance(module, nn.Linear):
        raise UserError(
            f"layer {target.name} is a {type(module).__name__}: compressed-tensors export covers Linear layers; "
            f"use the dense format"
        )
    w = target.weight
    grid = grid.to(w.device)
    codes = grid.codes(w)  # unsigned, float32 (float grids: indices into the format's codebook)
    if not torch.equal(grid.dequant(codes, w.dtype), w):  # the invariant check guarantees this after every stage
        raise InvariantError(f"layer {target.name}: its codes do not reproduce the evaluated weight")
    if isinstance(grid, FloatGrid):
        return _pack_float(target.name, w, grid, codes, act)
    scheme = weight_scheme(grid, act)
    mid = 2 ** (grid.bits - 1)
    signed = (codes - mid).to(torch.int8)
    local = {
        # The grid values in float32: the compressor's quantize (round(w / s) + z') gives back exactly `signed`.
        "weight": grid.dequant(codes).cpu(),
        "weight_scale": grid.scale.float().cpu(),
        "weight_zero_point": (grid.zero - mid).to(torch.int8).cpu(),
    }
    ct = scheme.scheme([target.name])
    compressor = PackedQuantizationCompressor if act is None else IntQuantizationCompressor
    packed = compressor.compress(local, ct)
    stored = packed["weight"] if act is not None else unpack_from_int32(packed["weight_packed"], grid.bits, w.shape)
    if not torch.equal(stored, signed.cpu()):
        raise InvariantError(f"layer {target.name}: stored codes differ from the grid's codes")
    packed["weight_scale"] = packed["weight_scale"].to(w.dtype)  # loaders hold scales in the model dtype
    back = compressor.decompress(packed, ct)["weight"].to(w.dtype)
    mismatched = int((back != w.cpu()).sum())
    return PackedLayer(scheme, packed, mismatched)


def e2m1_nibbles(codes: Tensor) -> Tensor:
    """FP4 E2M1 bit patterns (uint8, 0-15) of codes indexing the sorted E2M1 codebook (-6 … 6, zero at index 7):
    bit 3 the sign, bits 0-2 the magnitude's index in 0, .5, 1, 1.5, 2, 3, 4, 6."""
    offset = codes.long() - 7
    return ((offset < 0).to(torch.uint8) << 3) | offset.abs().to(torch.uint8)


def pack_e2m1(codes: Tensor) -> Tensor:
    """Two E2M1 values per byte along each row, the even column in the low nibble: (rows, cols / 2) uint8."""
    nib = e2m1_nibbles(codes)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


@torch.no_grad()
def _pack_float(name: str, w: Tensor, grid: FloatGrid, codes: Tensor, act: ActScheme | None) -> PackedLayer:
    """A float grid's codes and scales in compressed-tensors' layout for its format (nothing re-quantized: the
    stored scales are the grid's, checked to give back its float32 scales exactly), read back by the format's own
    decompressor to count what it does not give back."""
    scheme = weight_scheme(grid, act)
    values = codebook(grid.bits, codes.device)[codes.long()]  # the element values, exact in their format
    scale = grid.scale.float()
    if grid.fmt == "fp8":  # loaders hold these scales in the model's dtype (as the integer path writes them)
        tensors = {"weight": values.to(torch.float8_e4m3fn).cpu(), "weight_scale": scale.to(w.dtype).cpu()}
        stored, back_scale = tensors["weight"].float(), scale
    else:
        tensors = {"weight_packed": pack_e2m1(codes).cpu()}
        if grid.fmt == "nvfp4":
            g = nvfp4_global_scale(grid.tensor_scale).reshape(1)
            e4m3 = (scale * g).to(torch.float8_e4m3fn)  # the E4M3 group scale the grid divided by g
            tensors.update(weight_scale=e4m3.cpu(), weight_global_scale=g.cpu())
            back_scale = e4m3.float() / g
        else:  # E8M0: the power of two's exponent, biased by 127
            exponent = torch.round(torch.log2(scale)).to(torch.int32)
            tensors["weight_scale"] = (exponent + 127).to(torch.uint8).cpu()
            back_scale = torch.exp2(exponent.float())
        stored = unpack_fp4_from_uint8(tensors["weight_packed"], *w.shape, dtype=torch.float32).to(w.device)
    if not torch.equal(back_scale, scale):
        raise InvariantError(f"layer {name}: its {grid.fmt} scales are not stored exactly in the format's scale type")
    if not torch.equal(stored, values):
        raise InvariantError(f"layer {name}: stored codes differ from the grid's codes")
    ct = scheme.scheme([name])
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    back = compressor.decompress(dict(tensors), ct)["weight"].to(w.dtype)
    mismatched = int((back != w.cpu()).sum())
    return PackedLayer(scheme, tensors, mismatched)


def quantization_config(schemes: dict[str, WeightScheme | FloatScheme], ignore: list[str]) -> QuantizationConfig:
    """One config group per distinct scheme (per-layer widths give several), targets named layer by layer."""
    by_scheme: dict[WeightScheme | FloatScheme, list[str]] = defaultdict(list)
    for name, s in schemes.items():
        by_scheme[s].append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: (kv[0].bits, kv[0].group_size, kv[0].sym))
    groups = {f"group_{i}": s.scheme(names) for i, (s, names) in enumerate(ordered)}
    formats = {s.format for s in by_scheme}
    fmt = formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
    return QuantizationConfig(
        config_groups=groups, format=fmt, quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore
    )


def compressed_state_dict(model: nn.Module, packed: dict[str, PackedLayer]) -> dict[str, Tensor]:
    """The model's state dict with each packed layer's `weight` replaced by its compressed tensors."""
    state = dict(model.state_dict())
    for name, layer in packed.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v for k, v in layer.tensors.items()})
    return state


def write_config(save_dir: str, config: QuantizationConfig) -> None:
    """Add `quantization_config` (quant_method compressed-tensors) to save_dir/config.json, as compressed-tensors
    writes it."""
    ModelCompressor(quantization_config=config).update_config(save_dir)


def dense_linears(model: nn.Module, quantized: set[str]) -> list[str]:
    """Linear layers the checkpoint keeps dense (skipped, or pruned only): the config's `ignore` list."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
