"""Serving rules: which vLLM compressed-tensors path reads a saved checkpoint, whether it would serve it as
saved (and if not, why), and whether transformers reloads it. Policy about what others' kernels take, kept
apart from the packing (compressed_tensors.py), which writes what the node holds whatever the policy says."""

from __future__ import annotations

import torch
from torch import nn

from compress_order.export.compressed_tensors import FloatScheme, WeightScheme

# vLLM's compressed-tensors WNA16 path (pack-quantized weights, 16-bit activations; symmetric or with zero-points):
# the widths and group sizes its kernels (Marlin, Machete, ...) take, and the layer-shape multiples Marlin needs
# (output, input features).
VLLM_BITS = (4, 8)
VLLM_GROUP_SIZES = (-1, 32, 64, 128)
VLLM_MIN_SHAPE = (64, 128)
# vLLM fuses these projections into one layer, which must then carry one scheme.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def vllm_servability(model: nn.Module, schemes: dict[str, WeightScheme | FloatScheme]) -> tuple[str, bool, list[str]]:
    """Which vLLM compressed-tensors path reads the checkpoint (WNA16 for weight-only, its int8-activation
    schemes W8A8 / W4A8 otherwise, its FP8 / FP4 weight-only schemes for float grids), whether it would serve it
    as saved, and if not, why."""
    acts = {s.act for s in schemes.values()}
    if any(isinstance(s, FloatScheme) for s in schemes.values()):
        path, reasons = _float_reasons(schemes)
    elif acts == {None}:
        path, reasons = "WNA16", _wna16_reasons(model, schemes)
    elif any(a is not None and a.fmt is not None for a in acts):
        widths = "/".join(map(str, sorted({s.bits for s in schemes.values()})))
        path, reasons = (
            f"W{widths}A8 FP8",
            [
                f"integer {widths}-bit weights with FP8 activations (no vLLM "
                "compressed-tensors scheme takes that pairing here)"
            ],
        )
    else:
        path, reasons = _int_act_reasons(schemes)
    for fused, parts in VLLM_FUSED.items():
        for name in schemes:
            prefix, _, leaf = name.rpartition(".")
            if leaf != parts[0]:
                continue
            found = {schemes.get(f"{prefix}.{p}") for p in parts}
            if len(found) > 1:
                reasons.append(f"{prefix}: {', '.join(parts)} differ in scheme but vLLM fuses them into {fused}")
                break
    return path, not reasons, reasons


def _wna16_reasons(model: nn.Module, schemes: dict[str, WeightScheme]) -> list[str]:
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
    return reasons


def _int_act_reasons(schemes: dict[str, WeightScheme]) -> tuple[str, list[str]]:
    """vLLM's int8-activation schemes: W8A8 int8 takes symmetric 8-bit weights per channel with dynamic per-token
    (or static per-tensor) int8 activations; W4A8 int symmetric 4-bit weights per group or channel with dynamic
    per-token int8 activations. Dynamic per-tensor activations and other widths match none of them."""
    act = next(s.act for s in schemes.values() if s.act is not None)  # one run, one activation scheme
    widths = sorted({s.bits for s in schemes.values()})
    path = " + ".join({8: "W8A8 int8", 4: "W4A8 int"}.get(b, f"W{b}A{act.bits}") for b in reversed(widths))
    reasons: list[str] = []
    if act.bits != 8:
        reasons.append(f"{act.bits}-bit activations (vLLM's integer-activation kernels take int8)")
    if act.granularity == "tensor":
        reasons.append(
            "dynamic per-tensor activations (vLLM's int8 kernels take dynamic per-token or static per-tensor scales)"
        )
    if act.static and 4 in widths:
        reasons.append("static activations with 4-bit weights (vLLM's W4A8 int takes dynamic per-token ones)")
    other = [b for b in widths if b not in VLLM_BITS]
    if other:
        reasons.append(
            f"{'/'.join(map(str, other))}-bit weights with quantized activations (vLLM takes 8-bit: W8A8, "
            f"or 4-bit: W4A8)"
        )
    asym = sorted({s.bits for s in schemes.values() if not s.sym and s.bits in VLLM_BITS})
    if asym:
        reasons.append(
            f"asymmetric {'/'.join(map(str, asym))}-bit weights (vLLM's W8A8/W4A8 take symmetric weights, sym: true)"
        )
    grouped = sorted({s.group_size for s in schemes.values() if s.bits == 8 and s.group_size != -1})
    if grouped:
        reasons.append(
            f"8-bit weights in groups of {'/'.join(map(str, grouped))} (W8A8 int8 takes per-channel "
            f"weights, group_size=-1)"
        )
    return path, reasons


# vLLM's compressed-tensors schemes for float weights with 16-bit activations (CompressedTensorsW8A16Fp8,
# CompressedTensorsW4A16Fp4, CompressedTensorsW4A16Mxfp4): FP8 takes per-tensor, per-channel or block scales, the
# FP4 ones their formats' fixed groups. Layer-shape multiples their kernels need are not checked here.
VLLM_FLOAT_PATHS = {"fp8": "W8A16 FP8", "nvfp4": "W4A16 NVFP4", "mxfp4": "W4A16 MXFP4"}


def _float_reasons(schemes: dict[str, WeightScheme | FloatScheme]) -> tuple[str, list[str]]:
    floats = [s for s in schemes.values() if isinstance(s, FloatScheme)]
    path = " + ".join(sorted({VLLM_FLOAT_PATHS[s.fmt] for s in floats}))
    reasons: list[str] = []
    if len(floats) < len(schemes):
        reasons.append("integer and float weights in one checkpoint (vLLM reads one scheme family per model)")
    grouped = sorted({s.group_size for s in floats if s.fmt == "fp8" and s.group_size != -1})
    if grouped:
        reasons.append(
            f"FP8 weights in groups of {'/'.join(map(str, grouped))} along a row (vLLM's FP8 schemes take "
            f"per-tensor, per-channel or 128x128-block scales: group_size=-1)"
        )
    act = next((s.act for s in floats if s.act is not None), None)
    if act is not None and act.fmt is None:
        reasons.append(
            f"integer A{act.bits} input activations with float weights (vLLM's float schemes take 16-bit "
            f"or float activations)"
        )
    elif act is not None:  # FP8 activations: vLLM's W8A8 FP8 scheme, for FP8 weights
        path = "W8A8 FP8" if {s.fmt for s in floats} == {"fp8"} else path
        fp4 = sorted({s.fmt.upper() for s in floats if s.fmt != "fp8"})
        if fp4:
            reasons.append(
                f"{'/'.join(fp4)} weights with FP8 activations (vLLM's FP4 schemes take 16-bit or FP4 activations)"
            )
        if act.granularity == "tensor":
            reasons.append(
                "dynamic per-tensor FP8 activations (vLLM's W8A8 FP8 takes dynamic per-token or static "
                "per-tensor scales)"
            )
    return path, reasons


def transformers_reloads(schemes: dict[str, WeightScheme | FloatScheme], dtype: torch.dtype) -> bool:
    """Whether transformers' `from_pretrained` reloads the checkpoint into a `dtype` model. compressed-tensors 0.20
    builds the model it loads into with unpacked zero-points, so a checkpoint with (packed) zero-points fails there
    on a size mismatch; and it decompresses NVFP4 / MXFP4 weights into bfloat16, so other models fail on their
    first forward (a bfloat16 weight in a float32 matmul). Its own CompressedTensorsDequantizer and vLLM read all."""
    fp4 = any(isinstance(s, FloatScheme) and s.fmt != "fp8" for s in schemes.values())
    return all(s.sym for s in schemes.values()) and (not fp4 or dtype == torch.bfloat16)
