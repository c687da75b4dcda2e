"""The number formats by name, and what each fixes: weights (int, fp8, nvfp4, mxfp4: element bits, group, scale)
and activations (act_format: bits and granularities, the weight formats each pairs with). Tables and their
checks only, without torch, so a config is defaulted and checked before any heavy import (numerics/formats.py
and modeling/act.py do the arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compress_order.core.errors import UserError

FORMATS = ("int", "fp8", "nvfp4", "mxfp4")


@dataclass(frozen=True)
class FloatFormat:
    name: str
    bits: int  # element bits
    group_size: int | None  # fixed group (None: the run's group_size, -1 = per channel)
    scale: str  # "float32" | "e4m3+tensor" | "e8m0"
    scale_bits: int  # bits stored per group scale
    tensor_scale: bool  # one extra float32 scale per tensor


FLOAT_FORMATS = {
    "fp8": FloatFormat("fp8", 8, None, "float32", 32, False),
    "nvfp4": FloatFormat("nvfp4", 4, 16, "e4m3+tensor", 8, True),
    "mxfp4": FloatFormat("mxfp4", 4, 32, "e8m0", 8, False),
}


def format_bits(fmt: str, default: int) -> int:
    """The `bits` a format fixes (INT: the given default), for the root config's interpolation."""
    return FLOAT_FORMATS[fmt].bits if fmt in FLOAT_FORMATS else int(default)


def format_group(fmt: str, default: int) -> int:
    """The group size a format fixes (FP8: per channel; INT: the given default)."""
    if fmt in FLOAT_FORMATS:
        g = FLOAT_FORMATS[fmt].group_size
        return -1 if g is None else g
    return int(default)


def check_format(fmt: str, bits: int, group_size: int) -> None:
    """A format's name, and the bits and group size it fixes (a contradicting value given is an error)."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt} is unknown; valid: {', '.join(FORMATS)}")
    if fmt == "int":
        return
    f = FLOAT_FORMATS[fmt]
    if bits != f.bits:
        raise UserError(
            f"format={fmt} stores {f.bits}-bit elements; bits={bits} contradicts it (drop bits= to "
            f"follow the format, or use format=int)"
        )
    allowed = (f.group_size,) if f.group_size is not None else (-1, 128)
    if group_size not in allowed:
        raise UserError(
            f"format={fmt} takes group_size {' or '.join(map(str, allowed))}; group_size={group_size} "
            f"contradicts it (drop group_size= to follow the format)"
        )


# ---------------------------------------------------------------------------------------------------- activations
GRANULARITIES = ("token", "tensor", "static", "group")
ACT_FORMATS = ("fp8", "nvfp4")  # or null: integer activations (act_bits alone)
ACT_FORMAT_BITS = {"fp8": 8, "nvfp4": 4}
NVFP4_GROUP = 16
# The granularities each activation format takes (None: integer activations); the first is its default.
ACT_GRANULARITIES = {None: ("token", "tensor", "static"), "fp8": ("token", "tensor", "static"), "nvfp4": ("group",)}
# The weight formats each activation format is deployed with.
WEIGHT_FORMATS = {None: ("int",), "fp8": ("int", "fp8", "nvfp4", "mxfp4"), "nvfp4": ("nvfp4",)}


def act_format_bits(fmt: str | None) -> int | None:
    """The act_bits an activation format fixes (None: no format, activations full precision unless act_bits)."""
    return ACT_FORMAT_BITS.get(fmt) if fmt is not None else None


def act_format_granularity(fmt: str | None) -> str:
    """The default act_granularity of an activation format (integer and FP8: per token; NVFP4: its groups)."""
    return ACT_GRANULARITIES.get(fmt, GRANULARITIES)[0]


def check_act(
    bits: Any, granularity: Any, fmt: Any = None, weight_format: str | None = "int", save: bool = False
) -> None:
    """act_bits, act_granularity and act_format, and their pairing with the weights' `format` (module docstring;
    None: not checked) and with `save`."""
    if fmt is not None and fmt not in ACT_FORMATS:
        raise UserError(f"act_format={fmt} is unknown; valid: null, {', '.join(ACT_FORMATS)}")
    # The granularity is checked with act_bits off too: a bad value must not run and be saved as the config.
    if granularity not in GRANULARITIES:
        raise UserError(f"act_granularity={granularity} is unknown; valid: {', '.join(GRANULARITIES)}")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16):
        raise UserError(f"act_bits={bits} is outside 2-16 (or null for full-precision activations)")
    if fmt is not None and bits != ACT_FORMAT_BITS[fmt]:
        raise UserError(
            f"act_format={fmt} quantizes activations to {ACT_FORMAT_BITS[fmt]} bits; act_bits={bits} "
            f"contradicts it (drop act_bits= to follow the format)"
        )
    allowed = ACT_GRANULARITIES[fmt]
    if granularity not in allowed:
        what = f"act_format={fmt}" if fmt is not None else "integer activations (act_format=null)"
        raise UserError(
            f"act_granularity={granularity} does not apply to {what}; valid: {', '.join(allowed)}"
            + (" (drop act_granularity= to follow the format)" if fmt == "nvfp4" else "")
        )
    if bits is None:
        return
    if weight_format is not None and weight_format not in WEIGHT_FORMATS[fmt]:
        acts = f"act_format={fmt}" if fmt is not None else f"integer act_bits={bits}"
        pairs = [f"act_format={a}" for a in ACT_FORMATS if weight_format in WEIGHT_FORMATS[a]]
        raise UserError(
            f"{acts} activations do not pair with format={weight_format} weights; valid: format="
            f"{' or '.join(WEIGHT_FORMATS[fmt])}" + (f", or {' or '.join(pairs)}" if pairs else "")
        )
    if save:
        check_savable(fmt)


def check_savable(fmt: str | None) -> None:
    """Checkpoints record integer and FP8 (dynamic) activation schemes. An NVFP4 one would need a calibrated
    per-tensor global input scale, which this simulation computes per forward pass instead: not written."""
    if fmt == "nvfp4":
        raise UserError(
            "save: an act_format=nvfp4 run is not saved: an NVFP4 checkpoint's activations need a "
            "calibrated global input scale, which this run computes per forward pass; valid: "
            "act_format=fp8 or null with save=true, or save=false"
        )
