"""The compressible layers of a model, and snapshots of their weights and constraints for the order trie.

Every stage sees a layer's weight as one 2-D matrix (out, in·kh·kw) whose columns match the layer's input
columns (hessian.layer_columns). A `LayerAdapter` maps a layer type's stored weight to that view and back;
adding a layer type is one entry of `ADAPTERS`.

A target is a module's `.weight`, or one expert's slice of a fused 3-D parameter: transformers 5 stores the
experts of MoE families in one module (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I), or
transposed (E, in, out) where the module says `is_transposed`), so each of its E experts is one target
`<module>.<e>.<param>` seen as (out, in) like any Linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from compress_order.core.errors import UserError
from compress_order.numerics.constraints import LayerConstraint, check_invariants


@dataclass(frozen=True)
class LayerAdapter:
    """How one layer type stores its weight: `to_2d` gives the contiguous (out, in) matrix (a view of the stored
    tensor where the layout allows, else a copy: stages write back only through `Target.set_weight`), `from_2d`
    the stored layout of such a matrix. `linear`: the layer computes x @ W2dᵀ + bias over the last dimension of
    its input, so an nn.Linear can stand in for it (packed kernels exist for Linear only). `layout`: the stored
    tensor's axes in the view's terms, for readers of a saved checkpoint (export's sidecar records it)."""

    kind: type[nn.Module]
    to_2d: Callable[[Tensor], Tensor]
    from_2d: Callable[[Tensor, torch.Size], Tensor]
    linear: bool
    layout: str
    expert: bool = False  # one expert's slice of a fused (E, ·, ·) parameter


def _flatten(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


def _unflatten(w2d: Tensor, shape: torch.Size) -> Tensor:
    return w2d.reshape(shape)


def _transposed(w: Tensor) -> Tensor:
    return w.t().contiguous()  # contiguous like every other view: stages flatten it with .view


def _untransposed(w2d: Tensor, shape: torch.Size) -> Tensor:
    return w2d.t()


# transformers' Conv1D (GPT-2 family) is a Linear with its weight stored transposed: (in, out).
# A Conv2d's view is its weight flattened per output channel; with groups, every group's patches share
# the columns of that view (hessian.layer_columns), so grouped and depthwise convs need no entry of their own.
ADAPTERS: tuple[LayerAdapter, ...] = (
    LayerAdapter(nn.Linear, _flatten, _unflatten, linear=True, layout="(out, in)"),
    LayerAdapter(nn.Conv2d, _flatten, _unflatten, linear=False, layout="(out, in/groups, kh, kw)"),
    LayerAdapter(Conv1D, _transposed, _untransposed, linear=True, layout="(in, out)"),
)
COMPRESSIBLE = tuple(a.kind for a in ADAPTERS)
KIND_NAMES = "/".join(k.__name__ for k in COMPRESSIBLE) + "/fused experts"

# An expert's slice e of an (E, out, in) parameter is already the (out, in) view; an (E, in, out) one is a Linear
# weight stored transposed, like Conv1D.
EXPERT_ADAPTERS = {
    False: LayerAdapter(nn.Module, _flatten, _unflatten, linear=False, layout="(experts, out, in)", expert=True),
    True: LayerAdapter(nn.Module, _transposed, _untransposed, linear=False, layout="(experts, in, out)", expert=True),
}
# The fused projections of transformers' experts interface, in forward order: the first sees the routed hidden
# states, down_proj the gated intermediate.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def expert_params(module: nn.Module) -> list[str]:
    """The 3-D expert parameters of a fused experts module that transformers' experts interface describes (it
    sets `is_transposed` and `num_experts`); [] for any other module."""
    if not hasattr(module, "is_transposed") or not isinstance(getattr(module, "num_experts", None), int):
        return []
    return [n for n in EXPERT_PARAMS if isinstance(p := getattr(module, n, None), nn.Parameter) and p.dim() == 3]


def adapter_of(module: nn.Module) -> LayerAdapter | None:
    return next((a for a in ADAPTERS if isinstance(module, a.kind)), None)


def adapter_for(module: nn.Module) -> LayerAdapter:
    adapter = adapter_of(module)
    if adapter is None:
        raise TypeError(f"{type(module).__name__} is not a compressible layer ({KIND_NAMES})")
    return adapter


def weight_2d(module: nn.Module) -> Tensor:
    """A compressible layer's weight as the (out, in·kh·kw) matrix every stage and statistic uses."""
    return adapter_for(module).to_2d(module.weight.data)


def as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a `linear` layer computes, with its (out, in) weight and bias (same dtype and
    device); an nn.Linear is returned as it is."""
    if isinstance(module, nn.Linear):
        return module
    adapter = adapter_for(module)
    if not adapter.linear:
        raise TypeError(f"{type(module).__name__} cannot be served as an nn.Linear")
    w = adapter.to_2d(module.weight.data)
    bias = getattr(module, "bias", None)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w.clone(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.data.clone(), requires_grad=bias.requires_grad)
    return lin


@dataclass
class Target:
    """One compressible layer: `module.<param>`, or expert `index` of that fused 3-D parameter. Its weight is
    seen as 2-D (out, in·kh·kw) by every stage."""

    name: str
    module: nn.Module
    constraint: LayerConstraint = field(default_factory=LayerConstraint)
    param: str = "weight"
    index: int | None = None  # the expert, for a fused experts parameter

    @property
    def adapter(self) -> LayerAdapter:
        if self.index is not None:
            return EXPERT_ADAPTERS[bool(self.module.is_transposed)]
        return adapter_for(self.module)

    @property
    def parameter(self) -> nn.Parameter:
        """The parameter holding this target's weight (all experts' for an expert target)."""
        return getattr(self.module, self.param)

    @property
    def stored(self) -> Tensor:
        """The target's weight in its stored layout: a view into the parameter's data."""
        data = self.parameter.data
        return data if self.index is None else data[self.index]

    @property
    def dtype(self) -> torch.dtype:
        return self.parameter.dtype

    @property
    def device(self) -> torch.device:
        return self.parameter.device

    @property
    def weight(self) -> Tensor:
        return self.adapter.to_2d(self.stored)

    def set_weight(self, w2d: Tensor) -> None:
        stored = self.stored
        stored.copy_(self.adapter.from_2d(w2d, stored.shape))

    @property
    def shape(self) -> tuple[int, int]:
        meta = torch.empty(self.stored.shape, device="meta")  # the view's shape without copying data
        return tuple(self.adapter.to_2d(meta).shape)  # type: ignore[return-value]

    def check(self) -> None:
        check_invariants(self.name, self.weight, self.constraint)


def all_targets(model: nn.Module) -> dict[str, Target]:
    """Every compressible layer (an `ADAPTERS` type) and every expert of a fused experts module, skipped or not."""
    found: dict[str, Target] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, COMPRESSIBLE):
            found[name] = Target(name, mod)
        for pname in expert_params(mod):
            for e in range(getattr(mod, pname).shape[0]):
                found[f"{name}.{e}.{pname}"] = Target(f"{name}.{e}.{pname}", mod, param=pname, index=e)
    return found


def is_skipped(name: str, skip: list[str] | tuple[str, ...]) -> bool:
    """Whether a layer name matches one of the `skip` regexes (searched, not anchored)."""
    return any(re.search(p, name) for p in skip)


def find_targets(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> dict[str, Target]:
    """Every compressible layer and expert whose name matches none of the `skip` regexes."""
    found = {n: t for n, t in all_targets(model).items() if not is_skipped(n, skip)}
    if not found:
        raise UserError(f"no compressible layers ({KIND_NAMES}) left after skipping {list(skip)}")
    return found


# A target's weight and constraint by its name; the model's 1-D parameters (norm weights, biases) under
# "param:<name>" with no constraint: stages that rescale inputs fold their factors into those.
Snapshot = dict[str, tuple[Tensor, LayerConstraint | None]]
PARAM = "param:"


class ModelState:
    """The model's compressible weights plus their constraints, and every 1-D parameter: what a trie node
    snapshots and restores, so siblings start from their parent exactly whatever a stage rescaled."""

    def __init__(self, model: nn.Module, targets: dict[str, Target], snapshot_device: str = "cpu"):
        self.model = model
        self.targets = targets
        self.snapshot_device = snapshot_device
        self.params = {n: p for n, p in model.named_parameters() if p.dim() == 1}

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {
            n: (t.stored.to(self.snapshot_device, copy=True), t.constraint.clone(self.snapshot_device))
            for n, t in self.targets.items()
        }
        for n, p in self.params.items():
            snap[PARAM + n] = (p.data.to(self.snapshot_device, copy=True), None)
        return snap

    def restore(self, snap: Snapshot) -> None:
        for n, t in self.targets.items():
            w, c = snap[n]
            t.stored.copy_(w)
            t.constraint = c.clone(t.device)
        for n, p in self.params.items():
            if PARAM + n in snap:  # snapshots from before 1-D parameters were kept hold none
                p.data.copy_(snap[PARAM + n][0])

    def check(self) -> None:
        for t in self.targets.values():
            t.check()

    @torch.no_grad()
    def equal(self, snap: Snapshot) -> bool:
        """Bit-exact comparison with a snapshot (tests, and a guard after restores)."""
        return all(torch.equal(t.stored.cpu(), snap[n][0].cpu()) for n, t in self.targets.items()) and all(
            torch.equal(p.data.cpu(), snap[PARAM + n][0].cpu()) for n, p in self.params.items() if PARAM + n in snap
        )
