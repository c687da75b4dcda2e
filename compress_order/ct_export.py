"""A node's quantized weights as a compressed-tensors `pack-quantized` checkpoint, from the node's own grids.

Nothing is refit: each layer's integer codes are computed from its evaluated weight and the grid that put it there,
checked to reproduce that weight bit for bit, and handed with the grid's scales and zero-points to
compressed-tensors' own pack-quantized compressor; the config is built from its QuantizationConfig classes.

Conventions. Ours: w = (q - z)·s with unsigned codes q and integer zero-points z in [0, 2^b - 1] (compress_order/quant.py).
compressed-tensors: w = (q' - z')·s with signed q', z' in [-2^(b-1), 2^(b-1) - 1] and no zero-point when symmetric.
So q' = q - 2^(b-1) and z' = z - 2^(b-1): a symmetric grid has z = 2^(b-1), i.e. z' = 0. Loaders hold scales in
the model's dtype, so a float16/bfloat16 model reloads bit for bit only where its float32 scales survive that cast;
`exact` in the sidecar says whether they do.

Act-order: GPTQ here keeps groups in the original column order (act_order needs static groups), so its grids
need no group index (`weight_g_idx`); compressed-tensors 0.20 has dropped the dynamic (`group`) act-order anyway.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
import torch
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
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

from compress_order.errors import InvariantError, UserError
from compress_order.quant import QuantGrid
from compress_order.targets import Target

FORMAT = CompressionFormat.pack_quantized.value

# vLLM's compressed-tensors WNA16 path (pack-quantized weights, 16-bit activations; symmetric or with zero-points):
# the widths and group sizes its kernels (Marlin, Machete, ...) take, and the layer-shape multiples Marlin needs
# (output, input features).
VLLM_BITS = (4, 8)
VLLM_GROUP_SIZES = (-1, 32, 64, 128)
VLLM_MIN_SHAPE = (64, 128)
# vLLM fuses these projections into one layer, which must then carry one scheme.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class WeightScheme:
    """One config group: bits, group size (-1: one group per output channel) and symmetry."""

    bits: int
    group_size: int
    sym: bool

    def args(self) -> QuantizationArgs:
        strategy = QuantizationStrategy.CHANNEL if self.group_size == -1 else QuantizationStrategy.GROUP
        return QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=self.sym, strategy=strategy,
            group_size=None if self.group_size == -1 else self.group_size,
        )  # fmt: skip

    def describe(self) -> str:
        groups = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.bits}-bit {groups} {'symmetric' if self.sym else 'with zero-points'}"


def weight_scheme(grid: QuantGrid) -> WeightScheme:
    """The scheme a grid is written under. A symmetric grid whose zero-points are not all the midpoint (none is
    made so, but a grid is only data) is written with its zero-points."""
    mid = 2 ** (grid.bits - 1)
    sym = grid.sym and bool((grid.zero == mid).all())
    return WeightScheme(grid.bits, -1 if grid.n_groups == 1 else grid.group_size, sym)


@dataclass
class PackedLayer:
    scheme: WeightScheme
    tensors: dict[str, Tensor]  # local names: weight_packed, weight_scale, weight_shape (and weight_zero_point)
    mismatched: int  # weights the loader's arithmetic (scales in the model dtype) does not give back exactly


@torch.no_grad()
def pack_layer(target: Target) -> PackedLayer:
    """Codes of the evaluated weight on its own grid, packed by compressed-tensors' pack-quantized compressor."""
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
    codes = grid.codes(w)  # unsigned, float32
    if not torch.equal(grid.dequant(codes, w.dtype), w):  # the invariant check guarantees this after every stage
        raise InvariantError(f"layer {target.name}: its integer codes do not reproduce the evaluated weight")
    scheme = weight_scheme(grid)
    mid = 2 ** (grid.bits - 1)
    signed = (codes - mid).to(torch.int8)
    local = {
        # The grid values in float32: the compressor's quantize (round(w / s) + z') gives back exactly `signed`.
        "weight": grid.dequant(codes).cpu(),
        "weight_scale": grid.scale.float().cpu(),
        "weight_zero_point": (grid.zero - mid).to(torch.int8).cpu(),
    }
    ct = QuantizationScheme(targets=[target.name], weights=scheme.args(), format=FORMAT)
    packed = PackedQuantizationCompressor.compress(local, ct)
    if not torch.equal(unpack_from_int32(packed["weight_packed"], grid.bits, w.shape), signed.cpu()):
        raise InvariantError(f"layer {target.name}: packed codes differ from the grid's codes")
    packed["weight_scale"] = packed["weight_scale"].to(w.dtype)  # loaders hold scales in the model dtype
    back = PackedQuantizationCompressor.decompress(packed, ct)["weight"].to(w.dtype)
    mismatched = int((back != w.cpu()).sum())
    return PackedLayer(scheme, packed, mismatched)


def quantization_config(schemes: dict[str, WeightScheme], ignore: list[str]) -> QuantizationConfig:
    """One config group per distinct scheme (per-layer widths give several), targets named layer by layer."""
    by_scheme: dict[WeightScheme, list[str]] = defaultdict(list)
    for name, s in schemes.items():
        by_scheme[s].append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: (kv[0].bits, kv[0].group_size, kv[0].sym))
    groups = {
        f"group_{i}": QuantizationScheme(targets=names, weights=s.args(), format=FORMAT)
        for i, (s, names) in enumerate(ordered)
    }
    return QuantizationConfig(
        config_groups=groups, format=FORMAT, quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore
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


def vllm_servability(model: nn.Module, schemes: dict[str, WeightScheme]) -> tuple[bool, list[str]]:
    """Whether vLLM's compressed-tensors WNA16 path would serve the checkpoint as saved, and if not, why."""
    reasons: list[str] = []
    widths = sorted({s.bits for s in schemes.values()} - set(VLLM_BITS))
    if widths:
        reasons.append(f"{'/'.join(map(str, widths))}-bit weights (WNA16 takes {' or '.join(map(str, VLLM_BITS))})")
    sizes = sorted({s.group_size for s in schemes.values()} - set(VLLM_GROUP_SIZES))
    if sizes:
        reasons.append(f"group size {'/'.join(map(str, sizes))} (WNA16 takes -1, 32, 64, 128)")
    mods = dict(model.named_modules())
    rows, cols = VLLM_MIN_SHAPE
    odd = [n for n in schemes if mods[n].out_features % rows or mods[n].in_features % cols]
    if odd:
        reasons.append(f"{len(odd)} layer(s) not a multiple of {rows}x{cols} features, e.g. {odd[0]}")
    for fused, parts in VLLM_FUSED.items():
        for name in schemes:
            prefix, _, leaf = name.rpartition(".")
            if leaf != parts[0]:
                continue
            found = {schemes.get(f"{prefix}.{p}") for p in parts}
            if len(found) > 1:
                reasons.append(f"{prefix}: {', '.join(parts)} differ in scheme but vLLM fuses them into {fused}")
                break
    return not reasons, reasons


def transformers_reloads(schemes: dict[str, WeightScheme]) -> bool:
    """Whether transformers' `from_pretrained` reloads the checkpoint. compressed-tensors 0.20 builds the model it
    loads into with unpacked zero-points, so a checkpoint with (packed) zero-points fails there on a size mismatch;
    its own CompressedTensorsDequantizer and vLLM read them."""
    return all(s.sym for s in schemes.values())
