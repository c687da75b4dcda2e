"""The stage interface. A stage compresses one layer at a time and must keep every earlier constraint.

Data-free stages implement `compress(target, None)`. Calibrated stages set `needs` to the statistics they use
("hessian": X Xᵀ of the layer's inputs; "hessian_diag": only its diagonal ‖X_j‖², as Wanda reads) and receive them from the generic
calibration driver; the runner never special-cases a method.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from compress_order.core.errors import UserError
from compress_order.core.schemes import check_format
from compress_order.core.specs import BITS, GROUP_SIZE, SPARSITY, declared
from compress_order.modeling.targets import ModelState, Target
from compress_order.numerics.formats import fit_weight_grid
from compress_order.numerics.prune import nm_sparsity, parse_nm
from compress_order.numerics.quant import QuantGrid


class Stage:
    kind: ClassVar[str] = ""  # "prune", "quantize", "joint" or "transform" (rescales, keeps the function)
    needs: ClassVar[str | None] = None  # calibration statistics, None for data-free stages
    # True: the driver finds, for each group of layers fed one tensor, the producer of that tensor (a norm or a
    # linear layer) and passes it to `compress_group`, so the stage may rescale input channels (scaling.py).
    scales_inputs: ClassVar[bool] = False
    # True: the stage rewrites the model as a whole (`compress_model`), not one layer at a time: a rotation of the
    # residual stream, removing blocks. The trie's snapshots then keep every parameter and the model's structure.
    whole_model: ClassVar[bool] = False
    rewrites_all: ClassVar[bool] = False  # changes parameters beyond targets and 1-D ones (embeddings, lm_head)
    # The kinds of model (the loader's `kind`) the stage applies to; None: any. Checked before any model loads.
    model_kinds: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, name: str, label: str | None = None):
        self.name = name
        self.label = label or name

    def __init_subclass__(cls, **kw: Any) -> None:
        """A stage's parameters are declared once, by its `__init__`'s annotations: an option typed `Literal[...]`
        or `bool` is checked against its declaration when the stage is built (`scope=rwo` is an error, never the
        default), before the class's own range checks run."""
        super().__init_subclass__(**kw)
        if "__init__" not in vars(cls):
            return
        init = cls.__init__
        signature = inspect.signature(init)
        specs = {n: s for n, a in typing.get_type_hints(init).items() if (s := declared(a)) is not None}

        @functools.wraps(init)
        def checked(self: Stage, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            for key, spec in specs.items():
                if key in bound.arguments:
                    spec.check(bound.arguments[key], f"{kwargs.get('name', cls.__name__.lower())} {key}")
            init(self, *args, **kwargs)

        cls.__init__ = checked  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"

    @classmethod
    def inapplicable(cls, params: dict[str, Any]) -> dict[str, str]:
        """Parameters the stage would not apply as their value says, with why (resolved `params`, defaults filled
        in). Such a parameter's default is adapted (documented with the stage); given explicitly, in the stage
        entry or its yaml, it is refused (config/stages.py), so a label never names a setting that did nothing."""
        return {}

    @classmethod
    def unsavable(cls, params: dict[str, Any]) -> str | None:
        """Why a model holding this stage's result cannot be saved (`save=true`, `compress-order export`), or None."""
        return None

    def model_checks(self) -> list[str]:
        """The checks `validate` (and the run's probes) make once the model is loaded, one phrase each: what
        `compress-order validate` cannot check without loading it."""
        if self.scales_inputs:
            return [f"{self.label}: a norm or linear layer absorbs each layer group's input scales"]
        return []

    @classmethod
    def identity(cls, params: Mapping[str, Any], earlier_kinds: tuple[str, ...]) -> dict[str, Any]:
        """The parameters that decide what this stage does after stages of `earlier_kinds` (in order): all of
        them, unless a stage knows that one of its settings changes nothing there (node keys, run/identity.py)."""
        return dict(params)

    def validate(self, targets: dict[str, Target]) -> None:
        """Raise UserError for settings that cannot apply to these layers (before any work is done)."""

    def validate_model(self, state: ModelState) -> None:
        """For `whole_model` stages: raise UserError for a model whose structure the stage cannot handle (before
        any node is computed)."""

    def compress_model(self, state: ModelState, batches: list[Any] | None) -> None:
        """For `whole_model` stages: rewrite the model (its live targets' constraints kept and extended), with the
        calibration batches when the stage `needs` data."""
        raise NotImplementedError

    def feasible(self, targets: dict[str, Target]) -> str | None:
        """Why this stage cannot follow what the layers already hold (None: it can). Asked before each
        application; an infeasible order is reported as such, not run."""
        return None

    def compress(self, target: Target, stats: Any = None) -> None:
        raise NotImplementedError

    def compress_group(self, group: list[Target], stats: Any, partner: Any = None) -> None:
        """Layers fed the same input, with their shared statistics and (for `scales_inputs` stages) the
        producer of that input (scaling.Partner) or None when none was found."""
        for t in group:
            self.compress(t, stats)

    def compress_experts(self, unit: Any, routing: Any, block: Any) -> None:
        """For `needs = "routing"`: one MoE layer's experts (moe.ExpertUnit), with how the router spread the
        calibration tokens over them (moe.Routing); `block` is the module holding the layer and its router."""
        raise NotImplementedError

    # What the stage promises, for rows and tables.
    bits: int | None = None
    sparsity: float | None = None


class PruneMixin:
    """Sparsity settings shared by pruning stages: an unstructured target or an N:M pattern."""

    def _init_sparsity(self, sparsity: float, nm: str | None) -> None:
        self.nm = parse_nm(nm)
        if self.nm is not None:
            implied = nm_sparsity(self.nm)
            if sparsity not in (None, 0) and abs(float(sparsity) - implied) > 1e-9:
                raise UserError(
                    f"sparsity={sparsity} contradicts N:M {self.nm[0]}:{self.nm[1]} (which means {implied:g}); "
                    f"set sparsity={implied:g} or drop nm"
                )
            sparsity = implied
        self.sparsity = float(SPARSITY.check(sparsity, "sparsity"))

    def model_checks(self) -> list[str]:
        own = (
            [] if self.nm is None else [f"{self.label}: N:M {self.nm[0]}:{self.nm[1]}'s M divides every layer's inputs"]
        )
        return [*super().model_checks(), *own]  # type: ignore[misc]  (a mixin of Stage subclasses)

    def _validate_nm(self, targets: dict[str, Target]) -> None:
        if self.nm is None:
            return
        bad = [t.name for t in targets.values() if t.shape[1] % self.nm[1]]
        if bad:
            raise UserError(f"N:M {self.nm[0]}:{self.nm[1]}: M does not divide the inputs of {bad[0]}")


class QuantMixin:
    @classmethod
    def inapplicable(cls, params: dict[str, Any]) -> dict[str, str]:
        """`sym=false` asks for zero-points, which a float format's codebook has none of: its default adapts to
        symmetric, an explicit `sym: false` is refused."""
        fmt = params.get("format", "int")
        if fmt != "int" and params.get("sym") is False:
            return {"sym": f"format={fmt} is a symmetric codebook without zero-points; drop sym or use format=int"}
        return {}

    def _init_quant(self, bits: int, group_size: int, sym: bool, fmt: str = "int") -> None:
        BITS.check(bits, "bits")
        GROUP_SIZE.check(group_size, "group_size")
        check_format(fmt, bits, group_size)
        self.format = fmt
        # float codebooks are symmetric: no zero-point whatever `sym` says
        self.bits, self.group_size, self.sym = int(bits), int(group_size), bool(sym) or fmt != "int"

    def model_checks(self) -> list[str]:
        own = (
            [f"{self.label}: group_size={self.group_size} divides every layer's inputs"] if self.group_size > 0 else []
        )
        return [*super().model_checks(), *own]  # type: ignore[misc]  (a mixin of Stage subclasses)

    def _fit(self, w: Tensor, clip: float = 1.0):
        """The stage's grid for a weight, in its format."""
        return fit_weight_grid(w, self.format, self.bits, self.group_size, self.sym, clip)

    def _validate_groups(self, targets: dict[str, Target]) -> None:
        if self.group_size <= 0:
            return
        for t in targets.values():
            if t.shape[1] % self.group_size:
                raise UserError(
                    f"group_size={self.group_size} does not divide the {t.shape[1]} input features of {t.name}; "
                    f"use a divisor of it or group_size=-1 (per-channel)"
                )


def set_pruned(
    target: Target, w: Tensor, mask: Tensor, sparsity: float, nm: tuple[int, int] | None, label: str
) -> None:
    """Write pruned weights and record the (intersected) mask; zeros are on any grid, so a grid is kept."""
    c = target.constraint
    mask = mask if c.mask is None else (mask & c.mask)
    target.set_weight(w * mask)
    c.mask = mask
    c.min_sparsity = max(c.min_sparsity, sparsity)
    c.nm = nm or c.nm
    c.applied.append(label)


def set_quantized(target: Target, w: Tensor, grid: QuantGrid, label: str, record: bool = True) -> None:
    """Write weights already on `grid`; pruned positions are forced to the grid's exact zero. `record=False` for
    a joint stage whose one application set_pruned has recorded already."""
    c = target.constraint
    if c.mask is not None:
        w = w * c.mask
    target.set_weight(w)
    c.grid = grid
    if record:
        c.applied.append(label)
