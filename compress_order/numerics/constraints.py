"""Per-layer constraints that every later stage must keep, and the invariants checked after every stage.

A compressed layer carries its pruning mask (with the sparsity and N:M pattern it promised) and its
quantization grid. Whatever the order of stages, after each one:
  * pruned weights are exactly zero and the layer's sparsity is at least the promised target,
  * an N:M pattern holds in every group of M consecutive input weights of every row,
  * every weight lies exactly on the recorded grid (so at most 2^bits levels per group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from compress_order.core.errors import InvariantError
from compress_order.numerics.bits import count_bits, pack_bits, unpack_bits
from compress_order.numerics.quant import QuantGrid


class PackedMask:
    """A constraint's `mask`, held as bits (an eighth of a bool mask's bytes: a sweep keeps every layer's mask for
    as long as the model holds it) and read as the bool tensor it was set to, on the same device. Each read unpacks
    a new tensor: a mask is changed by setting a new one, never by editing what was read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.bits, self.shape = f"_{name}_bits", f"_{name}_shape"

    def __get__(self, obj: object, objtype: type | None = None) -> Tensor | None:
        if obj is None:  # the dataclass asks for the field's default
            return None
        bits = getattr(obj, self.bits)
        return None if bits is None else unpack_bits(bits, getattr(obj, self.shape), bits.device)

    def __set__(self, obj: object, mask: Tensor | None) -> None:
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"a mask is a bool tensor, not {mask.dtype}")
        setattr(obj, self.bits, None if mask is None else pack_bits(mask))
        setattr(obj, self.shape, None if mask is None else tuple(mask.shape))


@dataclass
class LayerConstraint:
    mask: Tensor | None = PackedMask()  # type: ignore[assignment]  # bool (rows, cols); True = weight kept
    min_sparsity: float = 0.0  # largest sparsity target promised by a pruning stage
    nm: tuple[int, int] | None = None  # N kept in every M consecutive inputs
    grid: QuantGrid | None = None
    applied: list[str] = field(default_factory=list)  # stage labels, in order
    dropped: bool = False  # an expert removed by expert pruning: all zero, never routed to, never compressed again

    @property
    def packed_mask(self) -> Tensor | None:
        """The mask's bits as held (numerics.bits.pack_bits), without unpacking them."""
        return self._mask_bits  # type: ignore[attr-defined]

    def __getstate__(self) -> dict:
        """Pickled (the state cache) with the bool mask, as a checkout that holds masks unpacked reads it."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_mask_bits", "_mask_shape")}
        return state | {"mask": self.mask}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        mask = state.pop("mask", None)
        self.__dict__.update(state)
        self.mask = mask

    def kept(self) -> Tensor | None:
        """The mask's kept count (its count_nonzero) from its bits, as a 0-d tensor on its device; None: no mask."""
        bits = self.packed_mask
        return None if bits is None else count_bits(bits)

    def clone(self, device: torch.device | str | None = None) -> "LayerConstraint":
        bits = self.packed_mask
        dev = device if device is not None else (bits.device if bits is not None else None)
        out = LayerConstraint(
            min_sparsity=self.min_sparsity,
            nm=self.nm,
            grid=None if self.grid is None else (self.grid.to(dev) if dev is not None else self.grid.clone()),
            applied=list(self.applied),
            dropped=self.dropped,
        )
        if bits is not None:  # the bits as they are: no unpacking
            out._mask_bits, out._mask_shape = bits.to(dev, copy=True), self._mask_shape  # type: ignore[attr-defined]
        return out

    def keep_mask(self, shape: torch.Size, device: torch.device) -> Tensor:
        """The current mask, or all-True when the layer was never pruned."""
        if self.mask is None:
            return torch.ones(shape, dtype=torch.bool, device=device)
        return self.mask


def required_zeros(sparsity: float, numel: int) -> int:
    """How many weights a sparsity target prunes: rounded to the nearest whole weight."""
    return int(round(sparsity * numel))


def nm_broken(mask: Tensor, n: int, m: int) -> Tensor:
    """Whether some group of m consecutive inputs of a row keeps more than n (a 0-d bool tensor)."""
    rows, cols = mask.shape
    return (mask.reshape(rows, cols // m, m).sum(-1) > n).any()


def nm_holds(mask: Tensor, n: int, m: int) -> bool:
    return not bool(nm_broken(mask, n, m))


# Rows of a layer checked at once: about this many weights, so the few passes over a slice find it in cache.
CHUNK = 1 << 20


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def magnitude_bits(w: Tensor) -> Tensor | None:
    """A float tensor's bits as integers of its width, shifted left past the sign: 0 exactly where w is ±0 (a NaN
    is not), so zeros are counted and tested with integer ops, several times faster on CPU than comparing floats.
    None for a width without an integer type (float8: compare the floats)."""
    int_type = _SAME_WIDTH_INT.get(w.element_size())
    return None if int_type is None else w.view(int_type) << 1


def nonzero_count(w: Tensor) -> Tensor:
    """Weights other than ±0 (a NaN counts), as a 0-d tensor on w's device."""
    bits = magnitude_bits(w)
    return (w != 0).count_nonzero() if bits is None else bits.count_nonzero()


def _nonzero_where(w: Tensor, where: Tensor | None = None) -> Tensor:
    """Whether w holds a value other than ±0 (NaN included), at `where` (bool, w's shape) or anywhere: 0-d bool."""
    bits = magnitude_bits(w)
    hits = (w != 0) if bits is None else bits
    return (hits if where is None else hits * where).count_nonzero() > 0


def _differs(x: Tensor, y: Tensor) -> Tensor:
    """Whether float32 x and y differ anywhere (NaN included), as 0-d bool: |x - y| has a non-zero max, as x - y = 0
    only for x = y (with gradual underflow, torch's default); a float max reduction is several times faster on CPU
    than a comparison and a bool `any`. x is overwritten."""
    return x.sub_(y).abs_().amax() != 0


def suspect(w: Tensor, c: LayerConstraint) -> Tensor | bool:
    """Whether the layer may break an invariant: True, False or a 0-d bool tensor on the weight's device (so the
    flags of many layers are read with one host sync). Never False for a layer `explain` finds broken; it may flag
    one that `explain` clears (an inf weight on an inf grid point), as it tests in fewer passes, on row slices that
    stay in cache: zeros by their bits, the grid by |projection - w| (`project_float`), the sparsity by a count."""
    g, mask = c.grid, c.mask
    if (mask is not None and mask.shape != w.shape) or (
        g is not None and g.scale.shape != (w.shape[0], w.shape[1] // g.group_size)
    ):
        return True
    flags: list[Tensor] = []
    if mask is not None:
        flags.append(mask.count_nonzero() > w.numel() - required_zeros(c.min_sparsity, w.numel()))
        if c.nm is not None:
            flags.append(nm_broken(mask, *c.nm))
    if g is not None:
        flags.append(g.invalid())
    if w.numel() and (c.dropped or mask is not None or g is not None):
        step = max(1, CHUNK // w.shape[1])
        for i in range(0, w.shape[0], step):
            rows = slice(i, i + step)
            if c.dropped:
                flags.append(_nonzero_where(w[rows]))
            if mask is not None:
                flags.append(_nonzero_where(w[rows], ~mask[rows]))
            if g is not None:
                flags.append(_differs(g.project_float(w[rows], rows), w[rows].float()))
    return torch.stack(flags).any() if flags else False


def explain(name: str, w: Tensor, c: LayerConstraint) -> str | None:
    """The first broken invariant of a layer, counted directly (the grid through its `project`), as an error
    message; None when every invariant holds."""
    where = f"layer {name} after [{' > '.join(c.applied)}]"
    if c.dropped and bool((w != 0).any()):
        return f"{where}: a removed expert has non-zero weights"
    if c.mask is not None:
        if c.mask.shape != w.shape:
            return f"{where}: mask shape {tuple(c.mask.shape)} != weight {tuple(w.shape)}"
        refilled = int((w[~c.mask] != 0).sum())
        if refilled:
            return f"{where}: {refilled} pruned weights are non-zero"
        need = required_zeros(c.min_sparsity, w.numel())
        have = int((~c.mask).sum())
        if have < need:
            return f"{where}: {have} pruned weights < {need} required by sparsity {c.min_sparsity}"
        if c.nm is not None and not nm_holds(c.mask, *c.nm):
            return f"{where}: {c.nm[0]}:{c.nm[1]} pattern broken"
    if c.grid is not None:
        g = c.grid
        if g.scale.shape != (w.shape[0], w.shape[1] // g.group_size):
            return f"{where}: grid shape {tuple(g.scale.shape)} does not fit weight {tuple(w.shape)}"
        off = int((g.project(w) != w).sum())
        if off:
            kind = "" if g.fmt == "int" else f" {g.fmt}"
            return f"{where}: {off} weights are off the {g.bits}-bit{kind} grid"
        why = g.problem()
        if why is not None:
            return f"{where}: {why}"
    return None


def check_invariants(name: str, w: Tensor, c: LayerConstraint) -> None:
    """Raise InvariantError naming the layer and the broken constraint."""
    why = explain(name, w, c) if bool(suspect(w, c)) else None
    if why is not None:
        raise InvariantError(why)


def check_layers(layers: Iterable[tuple[str, Callable[[], Tensor], LayerConstraint]]) -> None:
    """`check_invariants` of every (name, weight getter, constraint), reading the flags of all layers with one host
    sync per device instead of several per layer; the first broken layer, in the given order, raises."""
    seen = [(name, weight, c, suspect(weight(), c)) for name, weight, c in layers]
    flagged = {i for i, s in enumerate(seen) if s[3] is True}
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(seen):
        if isinstance(s[3], Tensor):
            by_device.setdefault(s[3].device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([seen[i][3] for i in idx]).tolist()  # type: ignore[misc]
        flagged.update(i for i, v in zip(idx, values) if v)
    for i in sorted(flagged):
        name, weight, c, _ = seen[i]
        why = explain(name, weight(), c)
        if why is not None:
            raise InvariantError(why)


def levels_per_group(w: Tensor, group_size: int) -> Tensor:
    """Distinct values in each (row, group): a direct count, used by tests and reports."""
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group_size, group_size)
    s = wg.sort(-1).values
    return (s[..., 1:] != s[..., :-1]).sum(-1) + 1
