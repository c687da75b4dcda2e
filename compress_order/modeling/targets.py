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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from compress_order.core.errors import UserError
from compress_order.modeling.weight_files import FileSpan
from compress_order.numerics.bits import fingerprint, pack_bits, pack_codes, raw_bits, unpack_bits, unpack_codes
from compress_order.numerics.constraints import LayerConstraint, check_invariants
from compress_order.numerics.quant import QuantGrid


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
    # Called before the weight is overwritten: open copy-on-write checkpoints save it first (ModelState.checkpoint)
    before_write: Callable[["Target"], None] | None = field(default=None, repr=False, compare=False)

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
        """The one writer of a layer-wise stage (and of block removal): checkpoints rely on it to copy on write."""
        if self.before_write is not None:
            self.before_write(self)
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


# A target's weight and constraint by its name; the model's other parameters under "param:<name>" with no
# constraint (1-D ones always: stages that rescale inputs fold their factors into norms and biases; all of them for
# a stage that rewrites the model as a whole); the model's structure under "struct:<what>".
Snapshot = dict[str, tuple[Tensor, LayerConstraint | None]]
PARAM, STRUCT = "param:", "struct:"
_NO_WEIGHT = torch.empty(0)  # a checkpoint's entry for a target: its weight is in `copies` or still in the model


@dataclass
class WeightCopy:
    """A target's weight as a checkpoint keeps it, bit-exact, in the smallest of these forms: the 2-D view whole;
    its kept entries with the mask in bits (pruned entries are zeros, a sign bit each for -0.0); its codes on its
    integer grid, two to a byte for grids of 4 bits or fewer (of the kept entries only, with the mask, when pruned;
    the -0.0 bits beside); a shared snapshot's tensor in the stored layout, or the model file's bytes (no copy of
    its own), whole or with a mask over it (a weight pruned without updating its kept entries: two bits a weight).
    A pruned or quantized weight takes well under its dense bytes: a 4-bit one a quarter of bf16's."""

    shape: tuple[int, int]
    dtype: torch.dtype
    whole: Tensor | None = None
    stored: Tensor | None = None  # the stored layout, referred to, not owned
    file: FileSpan | None = None  # the stored layout, read back from the model's file
    values: Tensor | None = None  # the kept entries, row-major
    keep: Tensor | None = None  # packed mask of the kept entries (of `values`, `codes`, `stored` or `file`)
    codes: Tensor | None = None  # numerics.bits.pack_codes of the (kept) entries' codes, row-major
    count: int = 0  # how many codes `codes` packs
    grid: QuantGrid | None = None
    negzero: Tensor | None = None  # packed bits of the entries that are -0.0

    @classmethod
    @torch.no_grad()
    def of(
        cls, w: Tensor, c: LayerConstraint, device: torch.device | str, base: "WeightCopy | None" = None
    ) -> "WeightCopy":
        """The smallest exact copy of the 2-D weight `w` that the layer's constraint suggests: the forms are tried
        smallest first, each checked to give `w` back bit for bit (else the whole weight is kept). `base`: the
        layer's dense weight where it is kept anyway (ModelState.dense_base), which a weight pruned from it (and
        not quantized: then it is off the dense values) is a mask over."""
        shape, elt, n = tuple(w.shape), w.element_size(), w.numel()
        negzero = (w == 0) & torch.signbit(w)
        mask = c.mask
        pruned = None if mask is None or mask.shape != w.shape else ~mask
        if pruned is not None and bool(w[pruned].any()):
            mask = pruned = None  # the pruned entries are not what the mask says
        kept = n if mask is None else int(mask.sum())
        g = c.grid
        forms: list[tuple[int, Callable[[], WeightCopy | None]]] = []
        if pruned is not None:
            if base is not None and g is None:
                forms.append((n // 4, lambda: cls._over(w, pruned, negzero, base)))
            forms.append((n // 4 + kept * elt, lambda: cls(shape, w.dtype, values=w[mask])))
        if type(g) is QuantGrid and g.bits <= 8 and g.scale.shape == (shape[0], shape[1] // g.group_size):
            # packed codes, sign bits (and mask bits), the grid's float32 scales and zeros
            codes = (kept if g.bits > 4 else (kept + 1) // 2) + n // (8 if pruned is None else 4) + 8 * g.scale.numel()
            forms.append((codes, lambda: cls._codes(w, g, mask, negzero, kept)))
        best = None
        for size, make in sorted(forms, key=lambda f: f[0]):
            if size >= n * elt or (best := make()) is not None:
                break
        if best is None:
            return cls(shape, w.dtype, whole=w.to(device, copy=True))  # type: ignore[arg-type]
        for name in ("values", "codes", "grid"):
            if (t := getattr(best, name)) is not None:
                setattr(best, name, t.to(device))
        best.keep = None if mask is None else c.packed_mask.to(device, copy=True)  # the constraint's own bits
        best.negzero = pack_bits(negzero).to(device)
        return best

    @classmethod
    def _over(cls, w: Tensor, pruned: Tensor, negzero: Tensor, base: "WeightCopy") -> "WeightCopy | None":
        """A mask over `base`'s dense weight, if that gives `w` back."""
        over = base.weight(w.device).reshape(w.shape).masked_fill(pruned, 0.0).masked_fill_(negzero, -0.0)
        if not torch.equal(raw_bits(over), raw_bits(w)):
            return None
        return cls(tuple(w.shape), w.dtype, stored=base.stored, file=base.file)  # type: ignore[arg-type]

    @classmethod
    def _codes(cls, w: Tensor, g: QuantGrid, mask: Tensor | None, negzero: Tensor, kept: int) -> "WeightCopy | None":
        """The (kept) entries' codes on the grid `g`, packed, if they give `w` back."""
        codes = g.codes(w)
        back = g.dequant(codes, w.dtype)
        if mask is not None:
            back.masked_fill_(~mask, 0.0)
        if not torch.equal(raw_bits(back.masked_fill_(negzero, -0.0)), raw_bits(w)):
            return None
        del back
        codes = codes.to(torch.uint8)
        packed = pack_codes(codes if mask is None else codes[mask], g.bits)
        return cls(tuple(w.shape), w.dtype, codes=packed, count=kept, grid=g.clone())  # type: ignore[arg-type]

    def nbytes(self) -> int:
        """Bytes it owns (a shared snapshot's tensor is not counted)."""
        parts = (self.whole, self.values, self.keep, self.codes, self.negzero)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def weight(self, device: torch.device | str) -> Tensor:
        """The 2-D weight, exactly as copied (for a `stored` or `file` copy without a mask: the stored layout)."""
        if self.whole is not None:
            return self.whole.to(device)
        keep = None if self.keep is None else unpack_bits(self.keep, self.shape, device)
        if self.stored is not None or self.file is not None:
            if self.stored is not None:
                w = self.stored.to(device)
            else:
                assert self.file is not None
                w = torch.empty(self.file.shape, dtype=self.file.dtype)
                self.file.read_into(w)
                w = w.to(device)
            if keep is None:
                return w
            w = w.reshape(self.shape).masked_fill(~keep, 0.0)  # not in place: `stored` is the shared snapshot's
        elif self.codes is not None:
            assert self.grid is not None
            codes = unpack_codes(self.codes.to(device), self.grid.bits, self.count).float()
            if keep is None:
                w = self.grid.to(device).dequant(codes.view(self.shape), self.dtype)
            else:
                q = torch.zeros(self.shape, device=device).masked_scatter_(keep, codes)
                w = self.grid.to(device).dequant(q, self.dtype).masked_fill_(~keep, 0.0)
        else:
            assert keep is not None and self.values is not None
            w = torch.zeros(self.shape, dtype=self.dtype, device=device).masked_scatter_(keep, self.values.to(device))
        assert self.negzero is not None
        return w.masked_fill_(unpack_bits(self.negzero, self.shape, device), -0.0)

    def write(self, t: Target) -> None:
        """Put the weight back into the target, exactly as copied."""
        stored = t.stored
        if self.file is not None and self.keep is None:
            self.file.read_into(stored)
            return
        w = self.weight(t.device)
        stored.copy_(w if self.stored is not None and self.keep is None else t.adapter.from_2d(w, stored.shape))


class Checkpoint:
    """A copy-on-write snapshot (ModelState.checkpoint): the constraints (their masks are bits), the other parameters and
    the structure as taken; a target's weight only once it is about to be overwritten (`copies`), checked unchanged
    by its `sums` otherwise. A `whole` state's checkpoint copies every weight at once (`sums` None): its stages
    write parameters directly."""

    def __init__(self, state: "ModelState") -> None:
        self.state = state
        self.snap: Snapshot = {}
        self.copies: dict[str, WeightCopy] = {}
        self.sums: dict[str, Tensor] | None = None

    def nbytes(self) -> int:
        """Bytes of the copies it holds (weights, masks, parameters, structure; grids are not counted)."""
        own = sum(e[0].numel() * e[0].element_size() for e in self.snap.values())
        own += sum(b.numel() for _, c in self.snap.values() if c is not None and (b := c.packed_mask) is not None)
        return own + sum(c.nbytes() for c in {id(c): c for c in self.copies.values()}.values())

    def close(self) -> None:
        """No restore follows: stop copying into it and free what it holds."""
        self.state._close(self)
        self.snap.clear()
        self.copies.clear()


# Per-layer settings of a config, rewritten when blocks are removed: lists with one entry per layer, lists of
# layer indices, and counts of leading layers (the first k dense MLPs, the first layers without sliding windows).
PER_LAYER_LISTS = ("layer_types",)
LAYER_INDEX_LISTS = ("mlp_only_layers",)
LEADING_COUNTS = ("first_k_dense_replace", "max_window_layers")


@dataclass
class BlockList:
    """A model's list of repeated blocks as loaded, and which of them (indices into `original`) it holds now."""

    container: nn.ModuleList
    original: tuple[nn.Module, ...]
    config: dict  # the per-layer config settings as loaded
    kept: tuple[int, ...]

    @property
    def removed(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.original)) if i not in self.kept)


def _encode(names: tuple[str, ...]) -> Tensor:
    return torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)


def _decode(data: Tensor) -> tuple[str, ...]:
    return tuple(bytes(data.tolist()).decode().split("\n"))


def text_config(model: nn.Module):
    """The config describing the decoder (a multimodal model's text part), or None."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def by_current_name(model: nn.Module, targets: dict[str, Target]) -> dict[str, Target]:
    """The targets the model holds now, by the names it gives them now: a removed block's are left out, the
    blocks after it renumbered (targets keep their names as loaded; a checkpoint holds the current ones)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, Target] = {}
    for t in targets.values():
        if id(t.module) in names:
            out[names[id(t.module)] + ("" if t.index is None else f".{t.index}.{t.param}")] = t
    return out


class ModelState:
    """The model's compressible weights plus their constraints, its other parameters, and its structure (which
    blocks it holds, whether its embeddings are tied): what a trie node snapshots and restores, so siblings start
    from their parent exactly whatever a stage rescaled, rotated or removed.

    Targets keep the names they had when loaded: a target of a removed block stays (as removed, zero weights) so
    sparsity and coverage count it; `by_current_name` gives the names the model has now (what a checkpoint holds)."""

    def __init__(self, model: nn.Module, targets: dict[str, Target], snapshot_device: str = "cpu", whole: bool = False):
        self.model = model
        self.targets = targets
        self.snapshot_device = snapshot_device
        self.whole = whole  # snapshot every parameter, not only targets and 1-D ones
        self.blocks: BlockList | None = None  # set by the first removal of blocks
        self.tied0 = self.tied()
        self.online: tuple[Tensor, tuple[str, ...]] | None = None  # a rotation applied to layers' inputs at run time
        self._online_hooks: list = []
        self._open: list[Checkpoint] = []  # checkpoints not closed yet, oldest first
        self._shared: tuple[Snapshot, dict[str, Tensor]] | None = None  # see `share`
        self._files: dict[str, tuple[FileSpan, Tensor]] = {}  # see `share_files`

    def params(self) -> dict[str, nn.Parameter]:
        """The parameters a snapshot keeps beside the targets' weights (named as the model holds them now)."""
        own = {id(t.parameter) for t in self.targets.values()}
        return {n: p for n, p in self.model.named_parameters() if (self.whole or p.dim() == 1) and id(p) not in own}

    # ---- structure: tied embeddings, removed blocks

    def tied(self) -> bool:
        get_in, get_out = (
            getattr(self.model, "get_input_embeddings", None),
            getattr(self.model, "get_output_embeddings", None),
        )
        if not callable(get_in) or not callable(get_out):
            return False
        inp, out = get_in(), get_out()
        return inp is not None and out is not None and out.weight is inp.weight

    def untie(self) -> None:
        """Give the output embedding its own copy of the input embedding's weight (a stage is about to change one
        of them alone); the config says so, so a saved checkpoint reloads untied."""
        if not self.tied():
            return
        out = self.model.get_output_embeddings()
        out.weight = nn.Parameter(out.weight.data.clone(), requires_grad=False)
        self.model.config.tie_word_embeddings = False

    def _tie(self) -> None:
        self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        self.model.config.tie_word_embeddings = True

    def remove_blocks(self, container: nn.ModuleList, positions: list[int], label: str = "") -> None:
        """Remove the blocks at `positions` (in the list as it is now) from the model for good: their targets are
        marked removed (zero weights, all pruned), the config describes the blocks left."""
        blocks = self._track(container)
        gone = [blocks.kept[p] for p in positions]
        for i in gone:
            ids = {id(m) for m in blocks.original[i].modules()}
            for t in self.targets.values():
                if id(t.module) in ids and not t.constraint.dropped:
                    c = t.constraint
                    t.set_weight(torch.zeros_like(t.weight))
                    c.mask = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
                    c.min_sparsity, c.dropped = 1.0, True
                    c.applied.append(label)
        self._set_blocks(tuple(i for i in blocks.kept if i not in gone))

    def _track(self, container: nn.ModuleList) -> BlockList:
        """The block list as loaded (and its per-layer config settings), recorded before its first edit."""
        if self.blocks is None:
            config = text_config(self.model)
            keys = PER_LAYER_LISTS + LAYER_INDEX_LISTS + LEADING_COUNTS
            saved = {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}
            self.blocks = BlockList(container, tuple(container), saved, tuple(range(len(container))))
        assert container is self.blocks.container, "one block list per model"
        return self.blocks

    def _set_blocks(self, kept: tuple[int, ...]) -> None:
        b = self.blocks
        assert b is not None
        del b.container[:]
        b.container.extend([b.original[i] for i in kept])
        b.kept = kept
        for position, block in enumerate(b.container):  # the KV cache is indexed by a block's position
            for m in block.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = position
        config = text_config(self.model)
        config.num_hidden_layers = len(kept)
        for key, value in b.config.items():
            if key in PER_LAYER_LISTS:
                setattr(config, key, [value[i] for i in kept])
            elif key in LAYER_INDEX_LISTS:
                setattr(config, key, [p for p, i in enumerate(kept) if i in value])
            else:
                setattr(config, key, sum(i < value for i in kept))

    @contextmanager
    def without_block(self, container: nn.ModuleList, position: int) -> Iterator[None]:
        """The model as if the block at `position` were removed, for a forward (scoring which block to remove)."""
        kept = self._track(container).kept
        self._set_blocks(kept[:position] + kept[position + 1 :])
        try:
            yield
        finally:
            self._set_blocks(kept)

    def set_online(self, online: tuple[Tensor, tuple[str, ...]] | None) -> None:
        """Rotate the inputs of the named modules by a matrix at run time (x ← x·H, before anything else that
        reads them: activation quantization, calibration), or remove such a rotation (None)."""
        for h in self._online_hooks:
            h.remove()
        for m in self.model.modules():
            m.__dict__.pop("online_rotation", None)
        self._online_hooks, self.online = [], online
        if online is None:
            return
        matrix, names = online
        cast: dict[tuple, Tensor] = {}

        def rotate_input(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            key = (x.device, x.dtype)
            if key not in cast:
                cast[key] = matrix.to(x.device, x.dtype)
            return (x @ cast[key], *args[1:])

        for name in names:
            module = self.model.get_submodule(name)
            module.online_rotation = True  # export refuses a model holding one: no checkpoint format here says it
            self._online_hooks.append(module.register_forward_pre_hook(rotate_input, prepend=True))

    # ---- snapshots

    def _rest(self, snap: Snapshot) -> None:
        """The parameters beside the targets and the structure into `snap`."""
        for n, p in self.params().items():
            snap[PARAM + n] = (p.data.to(self.snapshot_device, copy=True), None)
        if self.blocks is not None:
            snap[STRUCT + "blocks"] = (torch.tensor(self.blocks.kept, dtype=torch.long), None)
        snap[STRUCT + "tied"] = (torch.tensor(self.tied()), None)
        if self.online is not None:
            snap[STRUCT + "online"] = (self.online[0].to(self.snapshot_device, copy=True), None)
            snap[STRUCT + "online_at"] = (_encode(self.online[1]), None)

    def snapshot(self) -> Snapshot:
        """Every target's weight and constraint and the rest of the state, standalone: it stays valid whatever the
        model does next (the state cache saves it; several seeds restart from the dense one)."""
        snap: Snapshot = {
            n: (t.stored.to(self.snapshot_device, copy=True), t.constraint.clone(self.snapshot_device))
            for n, t in self.targets.items()
        }
        self._rest(snap)
        return snap

    def checkpoint(self) -> Checkpoint:
        """A snapshot for the order trie that copies a target's weight only when it is first written after this
        (`Target.set_weight`, or a restore), so a weight no later stage touches is never copied, and one copy serves
        every open checkpoint that lacks it. A state whose stages rewrite the model as a whole (`whole`) has its
        parameters written directly: then every weight is copied now. Close it as soon as no restore will follow."""
        ck = Checkpoint(self)
        self._rest(ck.snap)
        for n, t in self.targets.items():
            ck.snap[n] = (_NO_WEIGHT, t.constraint.clone(self.snapshot_device))
        if self.whole:
            for n, t in self.targets.items():
                ck.copies[n] = self._shared_copy(t) or WeightCopy.of(
                    t.weight, t.constraint, self.snapshot_device, self.dense_base(t)
                )
        else:
            ck.sums = {n: fingerprint(t.stored) for n, t in self.targets.items()}
            for n, t in self.targets.items():
                t.before_write = self._before_write
                shared = self._shared_copy(t, ck.sums[n])
                if shared is not None:
                    ck.copies[n] = shared
        self._open.append(ck)
        return ck

    def share(self, snap: Snapshot) -> None:
        """A standalone snapshot kept anyway (the runner's dense weights, for several seeds): a checkpoint taken
        while a weight still equals its entry there refers to that tensor instead of copying it."""
        self._shared = (snap, {n: fingerprint(snap[n][0]) for n in self.targets})

    def share_files(self, spans: dict[str, FileSpan]) -> int:
        """The model's weight files (weight_files.safetensors_spans, by parameter name): a checkpoint taken while a
        weight still equals its bytes there reads it back from the file rather than copying it. A target is matched
        by its parameter's name and checked bit-equal to its bytes now. Returns how many targets have a file."""
        self._files = {}
        for n, t in self.targets.items():
            span = spans.get(f"{n}.{t.param}") if t.index is None else None
            if span is not None and span.equals(t.stored):
                self._files[n] = (span, fingerprint(t.stored))
        return len(self._files)

    def _shared_copy(self, t: Target, sums: Tensor | None = None) -> WeightCopy | None:
        """A copy of a weight that refers to what holds it anyway, checked bit-equal: the model's file, or the shared
        snapshot; else None."""
        sums = fingerprint(t.stored) if sums is None else sums
        if t.name in self._files:
            span, file_sums = self._files[t.name]
            if torch.equal(sums, file_sums) and span.equals(t.stored):
                return WeightCopy(t.shape, t.dtype, file=span)
        if self._shared is None:
            return None
        snap, shared_sums = self._shared
        if not torch.equal(sums, shared_sums[t.name]):
            return None
        w = snap[t.name][0]
        if not torch.equal(raw_bits(t.stored), raw_bits(w.to(t.device))):
            return None
        return WeightCopy(t.shape, t.dtype, stored=w)

    def dense_base(self, t: Target) -> WeightCopy | None:
        """The target's dense weight where the run keeps it anyway (the model's file, or the shared snapshot), for a
        copy of a weight pruned from it to refer to; None where there is none, or where the stored layout is not
        the 2-D view reshaped (a mask over it would need the layer's transpose)."""
        if t.adapter.to_2d is not _flatten:
            return None
        if t.name in self._files:
            return WeightCopy(t.shape, t.dtype, file=self._files[t.name][0])
        if self._shared is not None:
            return WeightCopy(t.shape, t.dtype, stored=self._shared[0][t.name][0])
        return None

    def _close(self, ck: Checkpoint) -> None:
        if ck in self._open:
            self._open.remove(ck)
        if not any(c.sums is not None for c in self._open):
            for t in self.targets.values():
                t.before_write = None

    def _before_write(self, t: Target) -> None:
        """Copy the weight about to be overwritten into every open checkpoint that lacks it: unwritten since the
        oldest of them was taken, it is what each of them saw."""
        lacking = [ck for ck in self._open if t.name not in ck.copies]
        if lacking:
            copy = WeightCopy.of(t.weight, t.constraint, self.snapshot_device, self.dense_base(t))
            for ck in lacking:
                ck.copies[t.name] = copy

    def restore(self, snap: Snapshot | Checkpoint) -> None:
        """Put back what a snapshot or an open checkpoint holds: structure, weights, constraints, parameters."""
        ck = snap if isinstance(snap, Checkpoint) else None
        if ck is not None:
            if ck not in self._open:
                raise RuntimeError("restore from a closed checkpoint")
            snap = ck.snap
        if self.blocks is not None:
            entry = snap.get(STRUCT + "blocks")
            kept = tuple(range(len(self.blocks.original))) if entry is None else tuple(entry[0].tolist())
            if kept != self.blocks.kept:
                self._set_blocks(kept)
        tied = bool(snap[STRUCT + "tied"][0]) if STRUCT + "tied" in snap else self.tied0
        if tied and not self.tied():
            self._tie()
        elif not tied and self.tied():
            self.untie()
        online = snap.get(STRUCT + "online")
        if online is not None or self.online is not None:
            self.set_online(None if online is None else (online[0], _decode(snap[STRUCT + "online_at"][0])))
        for n, t in self.targets.items():
            w, c = snap[n]
            if ck is None:
                self._write(t, lambda t=t, w=w: t.stored.copy_(w))
            elif n in ck.copies:
                self._write(t, ck.copies[n].write)
            elif ck.sums is None or not torch.equal(fingerprint(t.stored), ck.sums[n]):
                raise RuntimeError(f"{n} changed since the checkpoint without Target.set_weight")
            assert c is not None
            t.constraint = c.clone(t.device)
        for n, p in self.params().items():
            if PARAM + n in snap:
                p.data.copy_(snap[PARAM + n][0])
            elif self.whole:  # a parameter the snapshot does not hold would keep another node's values
                raise RuntimeError(f"snapshot lacks parameter {n}")

    def _write(self, t: Target, write: Callable[[Target], object]) -> None:
        """Overwrite a target's weight from a snapshot: open checkpoints that lack it copy it first."""
        if self._open:
            self._before_write(t)
        write(t)

    def check(self) -> None:
        for t in self.targets.values():
            t.check()

    def _holds(self, t: Target, ck: Checkpoint) -> bool:
        """Whether the target's weight is bit-equal to what the checkpoint holds for it."""
        c = ck.copies.get(t.name)
        if c is None:
            return ck.sums is not None and torch.equal(fingerprint(t.stored), ck.sums[t.name])
        now = t.stored if (c.stored is not None or c.file is not None) and c.keep is None else t.weight
        return torch.equal(raw_bits(now.cpu()), raw_bits(c.weight("cpu")))

    @torch.no_grad()
    def equal(self, snap: Snapshot | Checkpoint) -> bool:
        """Bit-exact comparison of the weights and parameters with a snapshot or an open checkpoint (tests, and a
        guard after restores)."""
        params = self.params()
        if isinstance(snap, Checkpoint):
            ck, snap = snap, snap.snap
            same = all(self._holds(t, ck) for t in self.targets.values())
        else:
            same = all(torch.equal(t.stored.cpu(), snap[n][0].cpu()) for n, t in self.targets.items())
        return same and all(
            torch.equal(p.data.cpu(), snap[PARAM + n][0].cpu()) for n, p in params.items() if PARAM + n in snap
        )
