"""`compress-order export RUN_DIR --order "a > b"`: rebuild one full order of a finished run and save it as the run's
`save=true` would have (the checkpoint itself is written by compress_order/export/checkpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress_order.core.errors import Interrupted, UserError
from compress_order.core.schema import MODELS_DIR, SAVE_FORMATS, SAVED_CONFIG, SIDECAR
from compress_order.export.checkpoint import (
    act_scheme,
    checkpoint_format,
    model_dir,
    remove_stale_writes,
    save_model,
    summary_line,
)


def export_command(args: list[str]) -> int:
    """`compress-order export RUN_DIR --order "a > b" [--format ...] [--seed N]`: rebuild one full order of a finished
    run from its saved config (the same stages, settings and calibration seed: `--seed`, one of the run's seeds,
    default its first) and write it where the run saves it: RUN_DIR/models/<order>/ (several seeds: …/seed-<N>/)."""
    import argparse
    from typing import NoReturn

    def error(message: str) -> NoReturn:
        raise UserError(f'export: {message}; usage: export RUN_DIR --order "a > b" [--format FORMAT] [--seed N]')

    parser = argparse.ArgumentParser(prog="compress-order export", exit_on_error=False)
    parser.error = error  # type: ignore[method-assign]  (one line instead of argparse's usage and exit)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--order", required=True, help='a full order of the run, e.g. "magnitude > rtn"')
    parser.add_argument("--format", default="auto", dest="fmt", help=f"one of: {', '.join(SAVE_FORMATS)}")
    parser.add_argument("--seed", type=int, help="the calibration seed to rebuild (default: the run's first)")
    try:
        ns, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as e:
        error(str(e))
    if unknown:
        error(f"unexpected argument(s) {' '.join(unknown)}")
    checkpoint_format({}, ns.fmt)  # the format's name, before any model is loaded
    remove_stale_writes(ns.run_dir / MODELS_DIR)
    try:
        dest = export_order(ns.run_dir, tuple(s.strip() for s in ns.order.split(">")), ns.fmt, ns.seed)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: export left {ns.run_dir / MODELS_DIR} as it was (a checkpoint is written "
            f"beside its folder and renamed into place only when complete); run the same export "
            f"again to write it"
        ) from None
    record = json.loads((dest / SIDECAR).read_text(encoding="utf-8"))
    print(f"{dest}: {summary_line(record['checkpoint'])}")
    return 0


def export_order(run_dir: Path, order: tuple[str, ...], fmt: str = "auto", seed: int | None = None) -> Path:
    """Apply the stages of `order` to the run's dense model as the run did for calibration seed `seed` (default:
    the run's first), check every invariant, and save."""
    from compress_order.config.compose import load_saved  # also registers ${asset:}, which saved configs use
    from compress_order.config.settings import run_settings
    from compress_order.core.schemes import check_savable
    from compress_order.run.pipeline import RunContext
    from compress_order.run.trie import build_trie, full_orders

    saved = Path(run_dir).joinpath(*SAVED_CONFIG)
    if not saved.is_file():
        jobs = sorted(
            (p for p in Path(run_dir).glob("[0-9]*") if p.joinpath(*SAVED_CONFIG).is_file()), key=lambda p: int(p.name)
        )
        if jobs:  # a sweep's folder: its jobs are the runs
            shown = ", ".join(str(p) for p in jobs[:3]) + (", ..." if len(jobs) > 3 else "")
            raise UserError(f"{run_dir} is a sweep's folder; export from one of its {len(jobs)} jobs: {shown}")
        raise UserError(f"{run_dir} has no .hydra/config.yaml; expected the folder of a `compress-order run`")
    cfg = load_saved(saved)
    check_savable(cfg.get("act_format"))  # the reason such a run cannot be exported, before checking the rest
    settings = run_settings(cfg)
    by_label = {s.label: s for s in settings.stages + settings.joint}
    trie = build_trie([s.label for s in settings.stages], [s.label for s in settings.joint])
    full = {n.order for n in full_orders(trie)}
    if order not in full:
        valid = "; ".join(sorted(" > ".join(o) for o in full))
        raise UserError(f"order '{' > '.join(order)}' is not a full order of this run; valid: {valid}")
    from compress_order.config.validate import target_object
    from compress_order.export.checkpoint import check_packable

    check_packable(fmt, list(order), [getattr(target_object(by_label[lab].target), "kind", "") for lab in order])
    seeds = settings.seeds
    if seed is not None and seed not in seeds:
        raise UserError(f"seed {seed} is not a calibration seed of this run; valid: {', '.join(map(str, seeds))}")
    job = settings.with_seed(seeds[0] if seed is None else seed)
    ctx = RunContext.load(job)
    if not hasattr(ctx.lm.model, "save_pretrained"):
        raise UserError(f"export needs a Hugging Face model (save_pretrained); model '{ctx.lm.name}' has none")
    stages = ctx.build_stages({lab: by_label[lab] for lab in order})
    task = ctx.task(job)
    torch.manual_seed(job.seed)
    for lab in order:  # as the run did: static activation ranges observed before each calibrated stage
        why = ctx.apply(stages[lab], task, job.calibration)
        if why is not None:
            raise UserError(f"order '{' > '.join(order)}' is infeasible ({why}); nothing to export")
    dest = model_dir(run_dir, order, job.seed if job.several_seeds else None)
    scales = ctx.input_scales(task)
    return save_model(ctx.lm, ctx.targets, order, dest, fmt, job.dense_bits, act_scheme(job.act), scales)
