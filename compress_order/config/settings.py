"""The one conversion from a composed Hydra config to the typed settings every lower layer reads.

`run_settings` is called at the edge (the `run` job, `validate`, `export`, the predict-only plan) and nowhere
else. It runs every check a config gets before a model loads — known keys, each setting's declared range
(core/specs.py), the rules between settings (validate.py), each stage's own parameters (its constructor) — with
their one-line messages, then resolves what is left to resolve (devices, calibration seeds, packed backends) into
a frozen core.settings.RunSettings.
"""

from __future__ import annotations

import typing
from collections import Counter
from itertools import permutations
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from compress_order.config.stages import build_stage, stage_configs
from compress_order.config.validate import check_config, resolved
from compress_order.core.devices import resolve_device
from compress_order.core.errors import UserError
from compress_order.core.settings import (
    Activations,
    Calibration,
    Eval,
    Latency,
    LmEval,
    Loader,
    RunSettings,
    Save,
    Store,
    frozen_mapping,
)

if TYPE_CHECKING:
    import torch


def run_settings(cfg: DictConfig) -> RunSettings:
    """The composed config, checked and typed (UserError with one line on the first problem)."""
    check_config(cfg)
    c = resolved(cfg)
    stages = tuple(stage_configs(cfg))
    joint = tuple(stage_configs(cfg, key="joint"))
    for spec in stages + joint:
        build_stage(spec)  # the class's own checks of its parameters
    device = resolve_device(str(c["device"]))
    offload = c["eval"].get("offload")
    if offload not in (None, False) and device.type != "cpu":  # the runner would place the whole model there first
        raise UserError(
            f"eval.offload={offload} streams a model kept in CPU memory; set device=cpu "
            f"(and calibration.device for calibrated stages)"
        )
    seeds = tuple(c["seeds"]) if c["seeds"] is not None else tuple(c["seed"] + i for i in range(c["replicates"]))
    cache = c.get("state_cache") or {}
    settings = RunSettings(
        model=_loader(c["model"]),
        data=_loader(c["data"]),
        stages=stages,
        joint=joint,
        eval=_eval(c["eval"], device),
        calibration=Calibration(**{**c["calibration"], "device": _device(c["calibration"].get("device"))}),
        format=c["format"],
        bits=c["bits"],
        sparsity=float(c["sparsity"]),
        expert_sparsity=float(c["expert_sparsity"]),
        group_size=c["group_size"],
        act=None if c["act_bits"] is None else Activations(c["act_bits"], c["act_granularity"], c["act_format"]),
        seeds=seeds,
        seed=seeds[0],
        device=str(device),
        threads=c["threads"],
        dense_bits=c["dense_bits"],
        predict_only=c["predict_only"],
        orders=_orders(c["orders"], stages, joint),
        store=Store(
            dir=None if c["store_dir"] is None else str(c["store_dir"]),
            claim_timeout=float(c["store_claim_timeout"]),
            force=c["force"],
            cache_dir=cache.get("dir"),
            cache_max_gb=float(cache.get("max_gb", 20)),
        ),
        save=Save(enabled=c["save"], format=c["save_format"]),
    )
    _check_task(settings)
    if settings.save.enabled:
        _check_save(settings)
    return settings


def _orders(value: Any, stages: tuple, joint: tuple) -> tuple[tuple[str, ...], ...] | None:
    """`orders`: null (every order), or a list of full orders, each the stages' labels in some order (or one joint
    schedule's label alone); anything else is one line naming the order and the valid ones."""
    if value is None:
        return None
    labels = [s.label for s in stages]
    valid = list(dict.fromkeys(permutations(labels))) + [(j.label,) for j in joint]
    shown = ", ".join("[" + ", ".join(o) + "]" for o in valid[:8]) + (", ..." if len(valid) > 8 else "")
    if not isinstance(value, list) or not value:
        raise UserError(f"orders={value} must be null (every order) or a list of orders, e.g. [[{', '.join(labels)}]]")
    # a stage may be named by its label or, where one stage has it, by its name (`sparsegpt` for the label
    # `sparsegpt(grid=refit)`, which a shell would make you quote)
    by_name = Counter(s.name for s in stages + joint)
    alias = {s.name: s.label for s in stages + joint if by_name[s.name] == 1 and s.name not in labels}
    out = []
    for order in value:
        ok_type = isinstance(order, list) and all(isinstance(x, str) for x in order)
        names = tuple(alias.get(x, x) for x in order) if ok_type else None
        ok = names is not None and (Counter(names) == Counter(labels) or names in valid)
        if not ok:
            said = "[" + ", ".join(map(str, order)) + "]" if isinstance(order, list) else order
            raise UserError(f"orders: {said} is not an order of the stages [{', '.join(labels)}]; valid: {shown}")
        out.append(names)
    return tuple(dict.fromkeys(out))


def _check_save(settings: RunSettings) -> None:
    """The full orders of `stages` hold every stage: a format they cannot be written in is refused now."""
    from compress_order.config.validate import target_object
    from compress_order.export.checkpoint import check_packable

    kinds = [getattr(target_object(s.target), "kind", "") for s in settings.stages]
    check_packable(settings.save.format, [s.label for s in settings.stages], kinds)
    for spec in settings.stages:
        unsavable = getattr(target_object(spec.target), "unsavable", None)
        why = None if unsavable is None else unsavable(dict(spec.params))
        if why is not None:
            raise UserError(f"save=true: {why}")


def _check_task(settings: RunSettings) -> None:
    """What the task of this kind of model refuses, before it loads: data of another kind (a text dataset for an
    image classifier), settings it would ignore (kld on an image classifier). The model loader names its kind
    (`kind`), the data loader's return type says what the data is."""
    from compress_order.config.validate import target_object
    from compress_order.evaluation.tasks import check_task

    kind = model_kind(settings)
    if kind is None:  # a loader of the user's own: its task is known once it has loaded
        return
    for spec in settings.stages + settings.joint:
        kinds = getattr(target_object(spec.target), "model_kinds", None)
        if kinds is not None and kind not in kinds:
            words = {"causal_lm": "a language model", "image_classifier": "an image classifier"}
            raise UserError(
                f"stage '{spec.label}' applies to {' or '.join(words.get(k, k) for k in kinds)} only; model "
                f"'{settings.model.name}' is {words.get(kind, kind)} (choose another stage or model)"
            )
    try:
        data_type = typing.get_type_hints(target_object(settings.data.target)).get("return")
    except Exception:  # noqa: BLE001  (an annotation that does not resolve says nothing)
        data_type = None
    check_task(kind, data_type if isinstance(data_type, type) else None, settings)


def _loader(node: dict[str, Any]) -> Loader:
    return Loader(node["_target_"], frozen_mapping({k: v for k, v in node.items() if k != "_target_"}))


def _device(name: Any, key: str = "calibration.device") -> str | None:
    return None if name is None else str(resolve_device(str(name), key))


def _eval(ev: dict[str, Any], device: torch.device) -> Eval:
    from compress_order.evaluation.backends import select_backends  # imports the kernels: after the cheap checks

    metrics = ev.get("metrics") or ["perplexity"]
    offload = ev.get("offload")
    lm = dict(ev.get("lm_eval") or {})
    return Eval(
        batch_size=ev["batch_size"],
        seqlen=ev["seqlen"],
        max_windows=ev["max_windows"],
        metrics=tuple([metrics] if isinstance(metrics, str) else metrics),
        kld_topk=ev.get("kld_topk"),
        kld_tail_samples=ev.get("kld_tail_samples", 0),
        max_examples=ev.get("max_examples"),
        offload=None if offload in (None, False) else _device("auto" if offload is True else offload, "eval.offload"),
        backends=tuple(b.name for b in select_backends(ev.get("backends", "auto"), device)),
        latency=Latency(**ev["latency"]),
        word_perplexity=bool(ev.get("word_perplexity")),
        tasks=tuple(ev.get("tasks") or ()),
        lm_eval=LmEval(**{**lm, "model_args": frozen_mapping(lm.get("model_args") or {})}),
    )


def model_kind(settings: RunSettings) -> str | None:
    """The kind of model (the task that evaluates it) the model loader declares; None when it declares none."""
    from compress_order.config.validate import target_object

    return getattr(target_object(settings.model.target), "kind", None)


def model_checks(settings: RunSettings) -> list[str]:
    """What is checked only once the model is loaded: each stage's checks against the layers, the task's against
    the model and data, that every weight matrix is a target or in model.skip, and loading the weights itself."""
    from compress_order.config.stages import build_stage
    from compress_order.evaluation.tasks import model_checks as task_checks

    kind = model_kind(settings)
    out = [
        f"model '{settings.model.name}' loads",
        f"data '{settings.data.name}' loads",
        "every weight matrix is a stage target or in model.skip",
    ]
    out += task_checks(kind, settings) if kind is not None else []
    for spec in settings.stages + settings.joint:
        out += build_stage(spec).model_checks()
    return list(dict.fromkeys(out))
