"""Round-to-nearest quantization onto a min-max grid (per channel or per group, symmetric or asymmetric).

On a pruned layer the zeros stay zero: 0 is a grid point (integer zero-points), so rounding cannot refill them.
"""

from __future__ import annotations

from typing import Any

from compress_order.core.errors import UserError
from compress_order.modeling.targets import Target
from compress_order.stages.base import QuantMixin, Stage, set_quantized


class RTN(QuantMixin, Stage):
    kind = "quantize"

    def __init__(
        self, bits: int, group_size: int = -1, sym: bool = False, clip: float = 1.0, format: str = "int", **kw: Any
    ):
        """format: int | fp8 | nvfp4 | mxfp4 (formats.py): the element codebook and scale of the grid."""
        super().__init__(**kw)
        self._init_quant(bits, group_size, sym, format)
        if format != "int" and clip != 1.0:
            raise UserError(f"rtn clip={clip} shrinks integer ranges; a format={format} scale is max-scaled")
        self.clip = float(clip)

    def validate(self, targets: dict[str, Target]) -> None:
        self._validate_groups(targets)

    def compress(self, target: Target, stats: Any = None) -> None:
        w = target.weight
        grid = self._fit(w, self.clip)
        set_quantized(target, grid.project(w), grid, self.label)
