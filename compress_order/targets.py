"""The compressible layers of a model, and snapshots of their weights and constraints for the order trie.

Every stage sees a layer's weight as one 2-D matrix (out, in·kh·kw) whose columns match the layer's input
columns (hessian.layer_columns). A `LayerAdapter` maps a layer type's stored weight to that view and back;
adding a layer type is one entry of `ADAPTERS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from compress_order.constraints import LayerConstraint, check_invariants
from compress_order.errors import UserError


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
KIND_NAMES = "/".join(k.__name__ for k in COMPRESSIBLE)


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
    """One compressible layer. Its weight is seen as 2-D (out, in·kh·kw) by every stage."""

    name: str
    module: nn.Module
    constraint: LayerConstraint = field(default_factory=LayerConstraint)

    @property
    def adapter(self) -> LayerAdapter:
        return adapter_for(self.module)

    @property
    def weight(self) -> Tensor:
        return self.adapter.to_2d(self.module.weight.data)

    def set_weight(self, w2d: Tensor) -> None:
        stored = self.module.weight.data
        stored.copy_(self.adapter.from_2d(w2d, stored.shape))

    @property
    def shape(self) -> tuple[int, int]:
        meta = torch.empty_like(self.module.weight, device="meta")  # the view's shape without copying data
        return tuple(self.adapter.to_2d(meta).shape)  # type: ignore[return-value]

    def check(self) -> None:
        check_invariants(self.name, self.weight, self.constraint)


def find_targets(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> dict[str, Target]:
    """Every compressible layer (an `ADAPTERS` type) whose name matches none of the `skip` regexes (searched,
    not anchored)."""
    patterns = [re.compile(p) for p in skip]
    found = {
        name: Target(name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, COMPRESSIBLE) and not any(p.search(name) for p in patterns)
    }
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
            n: (t.module.weight.data.to(self.snapshot_device, copy=True), t.constraint.clone(self.snapshot_device))
            for n, t in self.targets.items()
        }
        for n, p in self.params.items():
            snap[PARAM + n] = (p.data.to(self.snapshot_device, copy=True), None)
        return snap

    def restore(self, snap: Snapshot) -> None:
        for n, t in self.targets.items():
            w, c = snap[n]
            t.module.weight.data.copy_(w)
            dev = t.module.weight.device
            t.constraint = c.clone(dev)
        for n, p in self.params.items():
            if PARAM + n in snap:  # snapshots from before 1-D parameters were kept hold none
                p.data.copy_(snap[PARAM + n][0])

    def check(self) -> None:
        for t in self.targets.values():
            t.check()

    @torch.no_grad()
    def equal(self, snap: Snapshot) -> bool:
        """Bit-exact comparison with a snapshot (tests, and a guard after restores)."""
        return all(torch.equal(t.module.weight.data.cpu(), snap[n][0].cpu()) for n, t in self.targets.items()) and all(
            torch.equal(p.data.cpu(), snap[PARAM + n][0].cpu()) for n, p in self.params.items() if PARAM + n in snap
        )
