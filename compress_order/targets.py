"""The compressible layers of a model, and snapshots of their weights and constraints for the order trie."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compress_order.constraints import LayerConstraint, check_invariants
from compress_order.errors import UserError

COMPRESSIBLE = (nn.Linear, nn.Conv2d)


@dataclass
class Target:
    """One compressible layer. Its weight is seen as 2-D (out, in·kh·kw) by every stage."""

    name: str
    module: nn.Module
    constraint: LayerConstraint = field(default_factory=LayerConstraint)

    @property
    def weight(self) -> Tensor:
        w = self.module.weight.data
        return w.reshape(w.shape[0], -1)

    def set_weight(self, w2d: Tensor) -> None:
        self.module.weight.data.copy_(w2d.reshape(self.module.weight.shape))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def check(self) -> None:
        check_invariants(self.name, self.weight, self.constraint)


def find_targets(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> dict[str, Target]:
    """Every Linear/Conv2d whose name matches none of the `skip` regexes (searched, not anchored)."""
    patterns = [re.compile(p) for p in skip]
    found = {
        name: Target(name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, COMPRESSIBLE) and not any(p.search(name) for p in patterns)
    }
    if not found:
        raise UserError(f"no compressible layers (Linear/Conv2d) left after skipping {list(skip)}")
    return found


Snapshot = dict[str, tuple[Tensor, LayerConstraint]]


class ModelState:
    """The model's compressible weights plus their constraints: what a trie node snapshots and restores."""

    def __init__(self, model: nn.Module, targets: dict[str, Target], snapshot_device: str = "cpu"):
        self.model = model
        self.targets = targets
        self.snapshot_device = snapshot_device

    def snapshot(self) -> Snapshot:
        return {
            n: (t.module.weight.data.to(self.snapshot_device, copy=True), t.constraint.clone(self.snapshot_device))
            for n, t in self.targets.items()
        }

    def restore(self, snap: Snapshot) -> None:
        for n, t in self.targets.items():
            w, c = snap[n]
            t.module.weight.data.copy_(w)
            dev = t.module.weight.device
            t.constraint = c.clone(dev)

    def check(self) -> None:
        for t in self.targets.values():
            t.check()

    @torch.no_grad()
    def equal(self, snap: Snapshot) -> bool:
        """Bit-exact comparison with a snapshot (tests, and a guard after restores)."""
        return all(torch.equal(t.module.weight.data.cpu(), snap[n][0].cpu()) for n, t in self.targets.items())
