"""One calibration driver for every calibrated stage and every model: block by block, through forward hooks.

The model's repeated blocks and what each is called with come from modeling/blocks.py (one forward per
calibration sample, blocks replaced by pass-through recorders); then for each block in turn:

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
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from compress_order.core.errors import UserError
from compress_order.core.settings import Calibration
from compress_order.modeling.act import paused as act_paused
from compress_order.modeling.blocks import (
    StopForward,
    device_of,
    units,
)
from compress_order.modeling.hessian import HessianStats
from compress_order.modeling.moe import ExpertUnit, collect_routing, expert_units, token_summary
from compress_order.modeling.targets import Target, adapter_of
from compress_order.stages.base import Stage

log = logging.getLogger(__name__)


# What a calibrated stage may ask for (`Stage.needs`): X Xᵀ of a layer's inputs, or only its diagonal ‖X_j‖²;
# or, per MoE layer, how the router spreads the tokens over the experts (moe.Routing, for `compress_experts`).
STATISTICS = ("hessian", "hessian_diag", "routing")


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
    except StopForward:
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
        raise StopForward

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
                except StopForward:
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
    live = {n: t for n, t in targets.items() if not t.constraint.dropped}
    was_training = model.training
    model.eval()
    walk = units(model, live, batches[:1], dev)
    try:
        with act_paused():  # static activation ranges are not observed yet; the probe compares full precision
            unit = next(walk, None)
            layers = [] if unit is None else [t for t in unit.targets if t.index is None]
            if layers:
                groups, _ = input_groups(unit.run, layers)
                if groups:
                    scaling_partners(unit.run, unit.module, groups, layers, stage, first=True)
    finally:
        walk.close()  # the probe reads the first unit only: nothing is advanced or compressed
        model.train(was_training)


def _calibration_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """Where blocks are calibrated: `device`, else where the model's parameters are."""
    dev = torch.device(device or device_of(model, torch.device("cpu")))
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
    was_training = model.training
    model.eval()
    try:
        for unit in units(model, targets, batches, dev):
            reached = compress_unit(
                unit.run,
                len(batches),
                unit.targets,
                stage,
                true_seq,
                dev,
                unit.module,
                first=unit.first,
                all_experts=all_experts,
                report=report,
            )
            if unit.module is model and reached == 0:
                raise UserError(
                    f"stage '{stage.label}': calibration inputs reach none of the {len(unit.targets)} target layers "
                    f"of {type(model).__name__} (first: {unit.targets[0].name}); use a data-free stage (magnitude, rtn)"
                )
    finally:
        model.train(was_training)
