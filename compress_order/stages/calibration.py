"""One calibration driver for every calibrated stage and every model: block by block, through forward hooks.

The repeated blocks of a decoder LM (model.layers, transformer.h, decoder.layers) are the nn.ModuleList of the
block classes the model declares in `_no_split_modules` (Hugging Face models), else, by structure, the list
whose children all hold target layers and that holds the most of them (and most of the model's); an
nn.Sequential of two or more children of one class is such a list too (timm's ViT `blocks`, ConvNeXt's
`stages`). One forward per calibration sample records what every block is called with (blocks replaced by
pass-through recorders, so nothing heavy runs); then for each block in turn:

  hooks on the block's targets accumulate input statistics over all samples → the stage compresses the
  block's targets → the block is re-run on all samples, and its compressed outputs are the next block's inputs.

Only the current block (and its statistics) needs to be on the compute device, so a model may sit on CPU.
`true_sequential` compresses a block's layers group by group in forward order (layers fed the same tensor,
e.g. q/k/v, form one group and share one statistic), re-collecting after each group so later layers see the
compressed earlier ones. A model without such a list (a plain CNN, ResNet's four separate stages), or whose
list is not a plain chain, is one block: the model's own forward on the batches. Targets outside the blocks (an
un-skipped lm_head) are done last the same way.
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
from compress_order.core.settings import Calibration
from compress_order.modeling.act import paused as act_paused
from compress_order.modeling.batches import model_forward
from compress_order.modeling.batches import to_device as _to
from compress_order.modeling.hessian import HessianStats
from compress_order.modeling.moe import ExpertUnit, collect_routing, expert_units, token_summary
from compress_order.modeling.targets import Target, adapter_of
from compress_order.stages.base import Stage

log = logging.getLogger(__name__)
_reported: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose blocks were logged (once each)


# What a calibrated stage may ask for (`Stage.needs`): X Xᵀ of a layer's inputs, or only its diagonal ‖X_j‖²;
# or, per MoE layer, how the router spreads the tokens over the experts (moe.Routing, for `compress_experts`).
STATISTICS = ("hessian", "hessian_diag", "routing")


def _report(model: nn.Module, msg: str, *args: Any) -> None:
    """INFO the first time for a model, DEBUG after: every calibrated stage finds the same blocks again."""
    level = logging.DEBUG if model in _reported else logging.INFO
    _reported.add(model)
    log.log(level, msg, *args)


class _Stop(Exception):
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


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else default


def _move_constraints(targets: list[Target], device: torch.device) -> None:
    for t in targets:
        c = t.constraint
        if (c.mask is not None and c.mask.device != device) or (c.grid is not None and c.grid.scale.device != device):
            t.constraint = c.clone(device)


@contextmanager
def _on_device(module: nn.Module, targets: list[Target], device: torch.device) -> Iterator[None]:
    """Move a module (and its targets' masks and grids) to the compute device for the duration, then back."""
    home = _device_of(module, device)
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
                raise _Stop
            slot, hidden = found
            if i == 0:
                hiddens.append(hidden)
            elif hidden is not st["prev"]:  # something ran between two blocks: not a plain chain
                st["chain"] = False
                raise _Stop
            rest_args = (None, *args[1:]) if slot == 0 else args
            rest_kw = kwargs if slot == 0 else {k: v for k, v in kwargs.items() if k != slot}
            calls[i][st["k"]] = _Call(rest_args, rest_kw, slot)
            if i == n_blocks - 1:
                raise _Stop
            if st["wrap"] is None:  # learn the output structure from one real call
                with _on_device(block, [], hidden.device):
                    out = real(*args, **kwargs)
                st["wrap"] = ("tuple", tuple(out[1:])) if isinstance(out, tuple) else ("tensor", None)
                del out
            st["prev"] = hidden
            st["passed"] = True
            kind, extra = st["wrap"]
            return hidden if kind == "tensor" else (hidden, *extra)

        return forward

    home = _device_of(model, device)
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i, block, block.forward)
        with _without(model, list_name):
            model.to(device)
        for k, batch in enumerate(batches):
            st["k"], st["prev"] = k, None
            try:
                model_forward(model, _to(batch, device))
            except _Stop:
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


# ---------------------------------------------------------------------------------------------------------
# One unit (a block, or the whole model): statistics, then compression


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


def _view(module: nn.Module) -> tuple:
    """What decides a layer's column view of its input (see hessian.layer_columns)."""
    if isinstance(module, nn.Conv2d):
        return ("conv", module.kernel_size, module.stride, module.padding, module.dilation, module.groups)
    adapter = adapter_of(module)
    if adapter is not None and adapter.linear:  # Linear and Conv1D both see the input's last dimension
        return ("linear",)
    return (type(module).__name__,)


def input_groups(run: Callable[[int], Any], targets: list[Target]) -> tuple[list[list[Target]], list[Target]]:
    """Targets grouped by the tensor they are fed, in forward order (q/k/v share one input), from one run of
    sample 0; and the targets that forward never reached."""
    by_id = {id(t.module): t for t in targets}
    seen: list[tuple[Target, Tensor]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        t = by_id[id(mod)]
        if all(s[0] is not t for s in seen):
            seen.append((t, _first_input(args, kwargs)))  # kept alive, so identity means "same tensor"

    handles = [t.module.register_forward_pre_hook(hook, with_kwargs=True) for t in targets]
    try:
        run(0)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[Tensor, list[Target]]] = []
    for t, x in seen:  # same tensor AND same column view: a 3×3 conv and a 1×1 shortcut unfold it differently
        g = next((g for g in groups if g[0] is x and _view(g[1][0].module) == _view(t.module)), None)
        if g is None:
            groups.append((x, [t]))
        else:
            g[1].append(t)
    reached = {id(t) for t, _ in seen}
    return [g[1] for g in groups], [t for t in targets if id(t) not in reached]


def compress_unit(
    run: Callable[[int], Any],
    n: int,
    targets: list[Target],
    stage: Stage,
    true_sequential: bool,
    device: torch.device,
    unit: nn.Module | None = None,
    first: bool = True,
    all_experts: bool = False,
    report: dict | None = None,
) -> int:
    """Collect statistics of `targets` over samples 0..n-1 of `run`, compress them; return how many targets
    calibration reached. Unreached targets are compressed with empty statistics (Hessian-free fallback).
    For a stage that rescales inputs, each group's producer is found in `unit` first (scaling.find_partners); the
    `first` unit of a model must have one, else the stage does not fit the model (said before any change).
    Experts of a fused MoE module get statistics of their routed tokens each (moe.py; `all_experts`: of every
    token), are compressed one by one with no scaling partner, and their token counts go to `report`."""
    if stage.needs not in STATISTICS:
        raise ValueError(f"stage '{stage.label}' needs '{stage.needs}'; the driver provides {', '.join(STATISTICS)}")
    units = expert_units(targets)
    if stage.needs == "routing":
        return route_unit(run, n, units, stage, unit)
    layers = [t for t in targets if t.index is None]
    groups, unreached = input_groups(run, layers) if layers else ([], [])
    diag_only = stage.needs == "hessian_diag"
    partners: dict[int, Any] = {}
    if stage.scales_inputs and unit is not None and groups:
        found = scaling_partners(run, unit, groups, layers, stage, first)
        partners = {id(groups[i][0]): p for i, p in found.items()}
        log.log(
            logging.INFO if first else logging.DEBUG,
            "scaling pairs in %s: %s",
            type(unit).__name__,
            "; ".join(
                f"{partners[id(g[0])]} → {'/'.join(t.name.rsplit('.', 1)[-1] for t in g)}"
                if id(g[0]) in partners
                else f"none → {'/'.join(t.name.rsplit('.', 1)[-1] for t in g)}"
                for g in groups
            ),
        )

    def stop() -> None:  # true-sequential: nothing after this group's input matters yet
        raise _Stop

    def collect(
        gs: list[list[Target]], seq: bool, experts: list[tuple[ExpertUnit, list[str]]] = ()
    ) -> tuple[list[HessianStats], dict[int, HessianStats]]:
        stats = [HessianStats(g[0].module, device, diag_only) for g in gs]
        handles = []
        for g, s in zip(gs, stats):

            def hook(mod: nn.Module, args: tuple, kwargs: dict, s: HessianStats = s) -> None:
                s.add_batch(_first_input(args, kwargs))
                if seq:
                    stop()

            handles.append(g[0].module.register_forward_pre_hook(hook, with_kwargs=True))
        routed: dict[int, HessianStats] = {}
        for u, params in experts:
            st, h = u.collect(params, lambda t: HessianStats(t, device, diag_only), all_experts, stop if seq else None)
            routed.update(st)
            handles.append(h)
        try:
            for k in range(n):
                try:
                    run(k)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return stats, routed

    def apply(g: list[Target], s: HessianStats) -> None:
        for t in g:
            if s.cols != t.shape[1]:  # a statistic shared by layers that view their input differently
                raise RuntimeError(f"{t.name}: input statistic has {s.cols} columns, the layer {t.shape[1]}")
        stage.compress_group(g, s, partners.get(id(g[0])))
        s.free()

    def apply_experts(u: ExpertUnit, params: list[str], routed: dict[int, HessianStats]) -> None:
        if u.tokens and params[0] == next(iter(u.by_param)):
            experts = sorted({t.index for t in u.targets})  # removed experts are not targets any more
            summary = token_summary([u.tokens[e] for e in experts])
            if report is not None:
                report[u.name] = summary
            log.info(
                "%s '%s': calibration tokens per expert min %d, median %g, max %d%s",
                u.name,
                stage.label,
                summary["min"],
                summary["median"],
                summary["max"],
                f"; {summary['without_tokens']} expert(s) got none and are compressed data-free"
                if summary["without_tokens"]
                else "",
            )
        for p in params:
            for t in u.by_param[p].values():
                apply([t], routed[id(t)])

    reached = 0
    if true_sequential:
        for g in groups:
            apply(g, collect([g], seq=True)[0][0])
        for u in units:
            for p in u.by_param:
                apply_experts(u, [p], collect([], seq=True, experts=[(u, [p])])[1])
    else:
        stats, routed = collect(groups, seq=False, experts=[(u, list(u.by_param)) for u in units])
        for g, s in zip(groups, stats):
            apply(g, s)
        for u in units:
            apply_experts(u, list(u.by_param), routed)
    for u in units:
        reached += len(u.targets) if u.tokens else 0
    for t in unreached:
        apply([t], HessianStats(t.module, device, diag_only))
    return reached + sum(len(g) for g in groups)


def scaling_partners(
    run: Callable[[int], Any],
    unit: nn.Module,
    groups: list[list[Target]],
    layers: list[Target],
    stage: Stage,
    first: bool,
) -> dict[int, Any]:
    """Each group's producer (by group index, scaling.find_partners); a UserError when the `first` unit of a
    model has none: then the stage does not fit the model at all."""
    from compress_order.modeling.scaling import find_partners

    found = find_partners(run, unit, groups, layers)
    if not found and first:
        raise UserError(
            f"stage '{stage.label}' rescales input channels, but no layer group of {type(unit).__name__} "
            f"(first: {groups[0][0].name}) has a producer (norm or linear layer) that can absorb the scales; "
            f"use a stage that does not rescale (rtn, gptq)"
        )
    return found


@torch.no_grad()
def check_scaling(
    model: nn.Module, targets: Mapping[str, Target], batches: list[Any], stage: Stage, calibration: Calibration
) -> None:
    """For a stage that rescales inputs: the producer probe of `calibrate_and_compress` on the model's first unit
    (its first block, or the whole model), on one sample, changing nothing. Run once the model is loaded, so a
    model without producers is refused before any node is evaluated, not when the stage is first applied."""
    if not stage.scales_inputs or not batches:
        return
    dev = _calibration_device(model, calibration.device)
    all_targets = [t for t in targets.values() if not t.constraint.dropped]
    found = find_blocks(model, targets)
    was_training = model.training
    model.eval()
    try:
        with act_paused():  # static activation ranges are not observed yet; the probe compares full precision
            captured = None if found is None else capture_block_calls(model, found[0], found[1], batches[:1], dev)
            if captured is not None:
                (hiddens, calls), block = captured, found[1][0]
                mods = {id(m) for m in block.modules()}
                unit, unit_targets = block, [t for t in all_targets if id(t.module) in mods]

                def run(k: int) -> Any:
                    args, kwargs = calls[0][k].bind(hiddens[k])
                    return block(*args, **kwargs)
            else:
                unit, unit_targets = model, all_targets

                def run(k: int) -> Any:
                    return model_forward(model, _to(batches[k], dev))

            layers = [t for t in unit_targets if t.index is None]
            if not layers:
                return
            with _on_device(unit, unit_targets, dev):
                groups, _ = input_groups(run, layers)
                if groups:
                    scaling_partners(run, unit, groups, layers, stage, first=True)
    finally:
        model.train(was_training)


def _calibration_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """Where blocks are calibrated: `device`, else where the model's parameters are."""
    dev = torch.device(device or _device_of(model, torch.device("cpu")))
    if dev.type == "cuda" and dev.index is None:  # compare equal to the parameters' "cuda:N"
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def route_unit(
    run: Callable[[int], Any], n: int, units: list[ExpertUnit], stage: Stage, block: nn.Module | None
) -> int:
    """A stage on the MoE layers of a unit, given how the router spreads samples 0..n-1 over their experts."""
    collected = [collect_routing(u) for u in units]
    try:
        for k in range(n):
            run(k)
    finally:
        for _, h in collected:
            h.remove()
    for u, (routing, _) in zip(units, collected):
        stage.compress_experts(u, routing, block)
    return sum(len(u.targets) for u in units)


# ---------------------------------------------------------------------------------------------------------
# The driver


@torch.no_grad()
def calibrate_and_compress(
    model: nn.Module,
    targets: Mapping[str, Target],
    batches: list[Any],
    stage: Stage,
    calibration: Calibration = Calibration(),
    device: torch.device | str | None = None,
    report: dict | None = None,
) -> None:
    """Compress every target with `stage`, feeding it input statistics from `batches`, block by block.

    `device`: where blocks and statistics are computed (default: calibration.device if set, else where the
    model's parameters are); the model may live elsewhere (CPU) and is left where it was.
    `report` receives the calibration tokens per expert of every fused MoE module (min / median / max).
    """
    if not batches:
        raise UserError(f"stage '{stage.label}' needs calibration data but calibration.nsamples=0; set it >= 1")
    true_seq, all_experts = calibration.true_sequential, calibration.moe_all_experts
    dev = _calibration_device(model, device or calibration.device)
    all_targets = list(targets.values())
    was_training = model.training
    model.eval()
    try:
        done: set[int] = set()
        found = find_blocks(model, targets)
        captured = None if found is None else capture_block_calls(model, found[0], found[1], batches, dev)
        if captured is not None:
            hiddens, calls = captured
            for i, block in enumerate(found[1]):
                mods = {id(m) for m in block.modules()}
                block_targets = [t for t in all_targets if id(t.module) in mods]
                with _on_device(block, block_targets, dev):

                    def run(k: int, i: int = i, block: nn.Module = block) -> Any:
                        args, kwargs = calls[i][k].bind(hiddens[k])
                        return block(*args, **kwargs)

                    compress_unit(
                        run,
                        len(batches),
                        block_targets,
                        stage,
                        true_seq,
                        dev,
                        block,
                        first=i == 0,
                        all_experts=all_experts,
                        report=report,
                    )
                    for k in range(len(batches)):  # the next block sees this block's compressed outputs
                        out = run(k)
                        hiddens[k] = out[0] if isinstance(out, (tuple, list)) else out
                calls[i] = []  # free this block's recorded calls
                done.update(id(t) for t in block_targets)
        rest = [t for t in all_targets if id(t) not in done]
        if rest:  # no usable block list, or layers outside it: the whole model is one block
            with _on_device(model, rest, dev):

                def run_model(k: int) -> Any:
                    return model_forward(model, _to(batches[k], dev))

                reached = compress_unit(
                    run_model,
                    len(batches),
                    rest,
                    stage,
                    true_seq,
                    dev,
                    model,
                    first=not done,
                    all_experts=all_experts,
                    report=report,
                )
                if reached == 0:
                    raise UserError(
                        f"stage '{stage.label}': calibration inputs reach none of the {len(rest)} target layers of "
                        f"{type(model).__name__} (first: {rest[0].name}); use a data-free stage (magnitude, rtn)"
                    )
    finally:
        model.train(was_training)
