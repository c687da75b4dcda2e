"""The repeated blocks of a model and what each is called with: what the calibration driver (and offloaded
evaluation) walks block by block.

The repeated blocks of a decoder LM (model.layers, transformer.h, decoder.layers) are the nn.ModuleList of the
block classes the model declares in `_no_split_modules` (Hugging Face models), else, by structure, the list
whose children all hold target layers and that holds the most of them (and most of the model's); an
nn.Sequential of two or more children of one class is such a list too (timm's ViT `blocks`, ConvNeXt's
`stages`). One forward per calibration sample records what every block is called with (blocks replaced by
pass-through recorders, so nothing heavy runs). A model without such a list, or whose list is not a plain chain,
is one block.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from compress_order.core.errors import UserError
from compress_order.modeling.batches import model_forward
from compress_order.modeling.batches import to_device as _to
from compress_order.modeling.targets import Target

log = logging.getLogger(__name__)
_reported: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose blocks were logged (once each)


def _report(model: nn.Module, msg: str, *args: Any) -> None:
    """INFO the first time for a model, DEBUG after: every calibrated stage finds the same blocks again."""
    level = logging.DEBUG if model in _reported else logging.INFO
    _reported.add(model)
    log.log(level, msg, *args)


class StopForward(Exception):
    """Raised from a hook to end a forward early once what it was run for has been recorded."""


# ---------------------------------------------------------------------------------------------------------
# Finding and feeding the blocks


# A block list is a ModuleList (decoder LMs loop over one) or an nn.Sequential of repeated blocks (timm keeps
# ViT blocks and CNN stages in Sequentials). A Sequential is usually a heterogeneous pipeline (conv, norm, act),
# so it counts only when it repeats: two or more children, all of one class.
BlockList = nn.ModuleList | nn.Sequential


def _block_lists(model: nn.Module) -> list[tuple[str, BlockList]]:
    out: list[tuple[str, BlockList]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            out.append((name, mod))
        elif isinstance(mod, nn.Sequential) and len(mod) > 1 and len({type(c) for c in mod}) == 1:
            out.append((name, mod))
    return out


def find_blocks(model: nn.Module, targets: Mapping[str, Target]) -> tuple[str, BlockList] | None:
    """The list of repeated blocks (a ModuleList, or a Sequential of one block class). From the model's own
    metadata when it has some (Hugging Face models name their block classes in `_no_split_modules`, which
    accelerate uses for the same purpose): the list whose children are all of those classes. Otherwise by
    structure: every child holds a target, most targets covered, then most children; and more than half of all
    targets, as a backbone does (one of ResNet's four stages is not: done first, it would be compressed before
    the layers feeding it). Logs what it found, so a wrong guess is visible."""
    ids = {id(t.module) for t in targets.values()}
    lists = _block_lists(model)
    declared = set(getattr(model, "_no_split_modules", None) or ())
    for name, mod in lists:
        if declared and all(type(child).__name__ in declared for child in mod):
            if any(id(m) in ids for m in mod.modules()):
                _report(
                    model,
                    "decoder blocks: %s × %d at %s (from _no_split_modules)",
                    type(mod[0]).__name__,
                    len(mod),
                    name,
                )
                return name, mod
    best: tuple[int, int, str, BlockList] | None = None
    for name, mod in lists:
        per_child = [sum(id(m) in ids for m in child.modules()) for child in mod]
        if min(per_child) == 0:
            continue
        key = (sum(per_child), len(mod))
        if best is None or key > best[:2]:
            best = (*key, name, mod)
    if best is not None and 2 * best[0] <= len(ids):
        best = None
    if best is None:
        _report(model, "decoder blocks: none found in %s; calibrating it as one block", type(model).__name__)
        return None
    kinds = sorted({type(child).__name__ for child in best[3]})
    _report(
        model,
        "decoder blocks: %s × %d at %s (by structure: the %s holding the most target layers)",
        "/".join(kinds),
        len(best[3]),
        best[2],
        type(best[3]).__name__,
    )
    return best[2], best[3]


def decoder_blocks(model: nn.Module, targets: Mapping[str, Target], who: str) -> nn.ModuleList:
    """The model's list of decoder blocks for a stage that edits or walks it whole (`who` names the stage), or
    UserError when it has none."""
    found = find_blocks(model, targets)
    if found is None or not isinstance(found[1], nn.ModuleList):
        raise UserError(f"{who}: no list of decoder blocks found in {type(model).__name__}")
    return found[1]


@dataclass
class _Call:
    """What a block was called with for one sample, minus the hidden state (bound per block and sample)."""

    args: tuple
    kwargs: dict
    slot: int | str  # positional index 0, or the keyword that carried the hidden state

    def bind(self, hidden: Tensor) -> tuple[tuple, dict]:
        if self.slot == 0:
            return (hidden, *self.args[1:]), self.kwargs
        return self.args, {**self.kwargs, self.slot: hidden}


def _hidden_of(args: tuple, kwargs: dict) -> tuple[int | str, Tensor] | None:
    if args and isinstance(args[0], Tensor):
        return 0, args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states", kwargs["hidden_states"]
    return None


def device_of(module: nn.Module, default: torch.device) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else default


def _move_constraints(targets: list[Target], device: torch.device) -> None:
    for t in targets:
        c = t.constraint
        bits = c.packed_mask
        if (bits is not None and bits.device != device) or (c.grid is not None and c.grid.scale.device != device):
            t.constraint = c.clone(device)


@contextmanager
def on_device(module: nn.Module, targets: list[Target], device: torch.device) -> Iterator[None]:
    """Move a module (and its targets' masks and grids) to the compute device for the duration, then back."""
    home = device_of(module, device)
    if home == device:
        yield
        return
    module.to(device)
    _move_constraints(targets, device)
    try:
        yield
    finally:
        module.to(home)
        _move_constraints(targets, home)


@contextmanager
def _without(model: nn.Module, list_name: str) -> Iterator[None]:
    """Temporarily detach the block list, so `model.to(...)` moves only what is around the blocks."""
    parent_name, _, attr = list_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = parent._modules[attr]
    parent._modules[attr] = nn.ModuleList()
    try:
        yield
    finally:
        parent._modules[attr] = blocks


def capture_block_calls(
    model: nn.Module, list_name: str, blocks: BlockList, batches: list[Any], device: torch.device
) -> tuple[list[Tensor], list[list[_Call]]] | None:
    """First-block hidden states and every block's call (args, kwargs) per sample, or None if the blocks are
    not a plain chain (some block's input is not the previous block's output, or a block is never called).

    Each block's forward is replaced by a recorder that returns its hidden input unchanged (shaped like the
    block's real output, learnt from one real call), so one cheap model forward per sample records
    the per-block keywords too (masks can differ between blocks, e.g. sliding-window layers); the last
    block's recorder stops the forward.
    """
    n_blocks, n = len(blocks), len(batches)
    hiddens: list[Tensor] = []
    calls: list[list[_Call | None]] = [[None] * n for _ in range(n_blocks)]
    st: dict[str, Any] = {"k": 0, "prev": None, "chain": True, "wrap": None, "passed": False}

    def recorder(i: int, block: nn.Module, real: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            found = _hidden_of(args, kwargs)
            if found is None:
                st["chain"] = False
                raise StopForward
            slot, hidden = found
            if i == 0:
                hiddens.append(hidden)
            elif hidden is not st["prev"]:  # something ran between two blocks: not a plain chain
                st["chain"] = False
                raise StopForward
            rest_args = (None, *args[1:]) if slot == 0 else args
            rest_kw = kwargs if slot == 0 else {k: v for k, v in kwargs.items() if k != slot}
            calls[i][st["k"]] = _Call(rest_args, rest_kw, slot)
            if i == n_blocks - 1:
                raise StopForward
            if st["wrap"] is None:  # learn the output structure from one real call
                with on_device(block, [], hidden.device):
                    out = real(*args, **kwargs)
                st["wrap"] = ("tuple", tuple(out[1:])) if isinstance(out, tuple) else ("tensor", None)
                del out
            st["prev"] = hidden
            st["passed"] = True
            kind, extra = st["wrap"]
            return hidden if kind == "tensor" else (hidden, *extra)

        return forward

    home = device_of(model, device)
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i, block, block.forward)
        with _without(model, list_name):
            model.to(device)
        for k, batch in enumerate(batches):
            st["k"], st["prev"] = k, None
            try:
                model_forward(model, _to(batch, device))
            except StopForward:
                pass
            except Exception:
                # Code between blocks choked on a passed-through (unprocessed) hidden state: the list is not a
                # plain chain. Errors before any pass-through are the model's own and propagate.
                if not st["passed"]:
                    raise
                return None
            if not st["chain"]:
                return None
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        if home != device:
            with _without(model, list_name):
                model.to(home)
    if len(hiddens) != n or any(c is None for row in calls for c in row):
        return None
    return hiddens, calls  # type: ignore[return-value]


@dataclass
class Unit:
    """What the driver compresses at once: a block (or the whole model), its targets, and a forward of it on
    calibration sample k."""

    module: nn.Module
    targets: list[Target]
    run: Callable[[int], Any]
    first: bool  # the model's first unit (what feeds it is the embedding, not a compressed block)


def units(model: nn.Module, targets: Mapping[str, Target], batches: list[Any], dev: torch.device) -> Iterator[Unit]:
    """The model's units in forward order, each on `dev` while it is handed out: every block of its block list,
    fed what the block before returned once the caller had compressed it; then the whole model for the targets
    outside the blocks (all of them when there is no usable block list)."""
    all_targets = list(targets.values())
    done: set[int] = set()
    found = find_blocks(model, targets)
    captured = None if found is None else capture_block_calls(model, found[0], found[1], batches, dev)
    if captured is not None:
        hiddens, calls = captured
        for i, block in enumerate(found[1]):
            mods = {id(m) for m in block.modules()}
            block_targets = [t for t in all_targets if id(t.module) in mods]

            def run(k: int, i: int = i, block: nn.Module = block) -> Any:
                args, kwargs = calls[i][k].bind(hiddens[k])
                return block(*args, **kwargs)

            with on_device(block, block_targets, dev):
                yield Unit(block, block_targets, run, first=i == 0)
                for k in range(len(batches)):  # the next block sees this block's compressed outputs
                    out = run(k)
                    hiddens[k] = out[0] if isinstance(out, (tuple, list)) else out
            calls[i] = []  # free this block's recorded calls
            done.update(id(t) for t in block_targets)
    rest = [t for t in all_targets if id(t) not in done]
    if rest:
        with on_device(model, rest, dev):
            yield Unit(model, rest, lambda k: model_forward(model, _to(batches[k], dev)), first=not done)
