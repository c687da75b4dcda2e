"""`compress-order` command line: run (Hydra), validate, list, and the analysis commands.

Bad input anywhere is reported as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Callable, NoReturn

from compress_order.core.errors import Interrupted, UserError
from compress_order.core.quiet import quiet_third_party
from compress_order.core.registry import Registry
from compress_order.core.settings import RunSettings

USAGE = """usage: compress-order COMMAND [ARGS]

commands:
  run [OVERRIDES] [-m]     run every order of the stage list (Hydra: --cfg job, -m for sweeps)
  validate [-m] [OVERRIDES]  compose and check a config (with -m: every point of the sweep) without running
  list                     models, datasets, stages, experiments and metrics available
  table PATH...            pivot results of runs into order-vs-order tables
  analyze PATH...          order advantage, intensity gaps and the Progressive Intensity test
  collect PATH...          every run under PATH into one tidy file
  export RUN_DIR --order "a > b" [--format auto|compressed-tensors|dense]
                           rebuild one full order of a run and save it (compressed-tensors pack-quantized)
  frontier PATH...         accuracy-vs-size Pareto frontier of every node, with its order and settings
  best PATH...             the best node within a budget (--max-size 1.2GB, --max-bits, --max-latency-ms)

examples:
  compress-order run                                   # embedded char-LLaMA, magnitude & RTN, 3 bits, 70%
  compress-order run stages=[rtn,magnitude] bits=4 sparsity=0.5
  compress-order run -m bits=3,4 sparsity=0.5,0.7
"""


def _hydra_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The command line parsed by Hydra's own parser, and the same arguments in the order that parser reads
    (flags, then the overrides: argparse takes a single run of positionals, so `bits=3 -m sparsity=0.5,0.7` is
    handed to Hydra as `-m bits=3 sparsity=0.5,0.7`)."""
    from hydra._internal.utils import get_args_parser

    def error(message: str) -> NoReturn:
        raise UserError(f"{message}; compress-order run --hydra-help lists Hydra's flags")

    parser = get_args_parser()
    parser.error = error  # type: ignore[method-assign]  (one line instead of argparse's usage and exit)
    parsed, unknown = parser.parse_known_intermixed_args(args)
    if unknown:
        error(f"unexpected argument(s) {' '.join(unknown)}")
    flags, pending = [], list(parsed.overrides)
    for a in args:
        if pending and a == pending[0]:
            pending.pop(0)
        else:
            flags.append(a)
    return parsed, flags + parsed.overrides


def _multirun(h: argparse.Namespace) -> bool:
    """Whether Hydra will sweep: `-m`, or `hydra.mode: MULTIRUN` in the composed config (an experiment's)."""
    from hydra.types import RunMode

    from compress_order.config.compose import compose_config, expand_overrides

    if h.multirun:
        return True
    plain = [o for o in h.overrides if len(expand_overrides([o])) == 1]  # a sweep value does not compose alone
    return compose_config(plain, hydra=True).hydra.mode == RunMode.MULTIRUN


CFG_CHOICES = ("job", "hydra", "all")


def _check_flags(args: list[str]) -> None:
    """Hydra answers a bad flag value with its whole usage text: say what is wrong in one line instead."""
    for i, a in enumerate(args):
        if a in ("--cfg", "-c"):
            value = args[i + 1] if i + 1 < len(args) else None
            if value not in CFG_CHOICES:
                raise UserError(f"{a} takes one of: {', '.join(CFG_CHOICES)} (got {value!r})")


def cmd_run(args: list[str]) -> int:
    from compress_order.config import compose as config  # noqa: F401  (registers resolvers before Hydra composes)

    _check_flags(args)
    h, ordered = _hydra_args(args)
    other = [
        f
        for f, v in (("--config-path", h.config_path), ("--config-name", h.config_name), ("--config-dir", h.config_dir))
        if v
    ]
    if other:  # the checks before a run compose compress_order/conf; another config would run unchecked
        raise UserError(
            f"{' '.join(other)} is not supported: a run composes compress_order/conf, which every check reads before "
            f"it starts; choose experiment=NAME and overrides"
        )
    if h.cfg and not _multirun(h):  # --cfg prints the config Hydra composes, which a sweep value does not
        config.no_sweep(h.overrides)
    if not (h.cfg or h.info or h.help or h.hydra_help or h.shell_completion):  # these only print
        settings = config.validate_overrides(h.overrides, _multirun(h))  # every sweep point, before heavy work
        from compress_order.run.plan import cost, plan_sweep  # imports torch: after the checks

        plans, jobs = plan_sweep(settings)
        print(cost(plans, jobs).line(), flush=True)
        _print_saving(settings, plans, jobs)
    from compress_order.cli.launch import hydra_main

    return hydra_main(ordered)


VALIDATE_USAGE = """usage: compress-order validate [-m] [OVERRIDES]

Compose the config as `compress-order run` would and run every check that needs no model (with -m, or an
experiment that sweeps: for every point of the sweep), then print each configuration's trie, the checks only a
loaded model can make, and the plan's cost. Nothing is loaded, run or written. Exit 0: valid as far as can be
checked without the model; exit 2: one line saying what is wrong.

examples:
  compress-order validate stages=[rtn,magnitude] bits=4
  compress-order validate -m bits=3,4 sparsity=0.5,0.7
  compress-order validate -m experiment=mini_lm"""

LIST_USAGE = """usage: compress-order list

The models, datasets, evaluation settings, experiments and launchers (config groups), the stages with their
parameters, the latency backends and the metrics."""


def _only_sweep_flags(h: argparse.Namespace, command: str) -> None:
    """`validate` reads overrides and -m; a Hydra flag that only `run` acts on is refused, not ignored."""
    used = [
        flag
        for flag, given in (
            ("--cfg", h.cfg),
            ("--resolve", h.resolve),
            ("--package", h.package),
            ("--info", h.info),
            ("--run", h.run),
            ("--config-path", h.config_path),
            ("--config-name", h.config_name),
            ("--config-dir", h.config_dir),
            ("--experimental-rerun", h.experimental_rerun),
            ("--shell-completion", h.shell_completion),
        )
        if given
    ]
    if used:
        raise UserError(
            f"{command} takes overrides and -m only, not {' '.join(used)}; see compress-order {command} --help"
        )


def cmd_validate(args: list[str]) -> int:
    from compress_order.config.compose import validate_overrides
    from compress_order.config.settings import model_checks

    h, _ = _hydra_args(args)
    if h.help or h.hydra_help:
        print(VALIDATE_USAGE)
        return 0
    _only_sweep_flags(h, "validate")
    valid = validate_overrides(h.overrides, multirun=_multirun(h))
    from compress_order.config.stages import stage_class
    from compress_order.run.plan import cost, plan_sweep, plan_trie  # imports torch: after the checks
    from compress_order.run.trie import build_trie, count_applications
    from compress_order.stages.base import Stage

    plans, jobs = plan_sweep(valid)
    later: list[str] = []  # what only a loaded model can tell, over every configuration
    for settings in valid:
        checks = model_checks(settings)
        later += [c for c in checks if c not in later]
        labels = [s.label for s in settings.stages]
        trie = build_trie(labels, [s.label for s in settings.joint])
        n_full = sum(1 for n in trie.walk() if n.depth == len(labels))
        shape = f"{n_full} orders, {count_applications(trie)} stage applications"
        if settings.predict_only:  # the plan's trie: dense and each stage alone
            shape = f"predict only: {count_applications(plan_trie(settings, True))} single stages (of {shape})"
        elif settings.orders is not None:  # the listed orders and their prefixes
            cut = plan_trie(settings, False)
            shape = f"{len(settings.orders)} listed orders, {count_applications(cut)} stage applications (of {shape})"
        seeds = list(settings.seeds)
        # A stage that cannot follow some others (rotate after a pruner, SmoothQuant after a per-channel grid) is
        # found out on the loaded layers: the counts are the most a run applies.
        picky = [s.label for s in settings.stages if stage_class(s).feasible is not Stage.feasible]
        if picky:
            shape += (
                f" at most ({', '.join(picky)}: whether it can follow the stages before it is decided on the loaded "
                f"model; an order where it cannot is reported infeasible, not run)"
            )
        print(
            f"ok: model={settings.model.name} data={settings.data.name} stages={labels} bits={settings.bits} "
            f"sparsity={settings.sparsity}: {shape}" + (f", seeds {seeds}" if len(seeds) > 1 else "")
        )
    print(
        f"{len(valid)} configuration(s) valid as far as can be checked without loading the model: {len(later)} "
        f"checks need the model (a run makes them once it has loaded it, before any stage): {'; '.join(later)}"
    )
    print(cost(plans, jobs).line())
    _print_saving(valid, plans, jobs)
    return 0


def _print_saving(valid: list[RunSettings], plans: list, jobs: int) -> None:
    """With predict_only: what the cut tries leave out of the full ones, against the same store."""
    from compress_order.run.plan import plan_sweep, saving

    if any(p.predict_only for p in plans):
        print(saving(plans, plan_sweep(valid, predict_only=False)[0], jobs), flush=True)


def cmd_list(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        print(LIST_USAGE)
        return 0
    if args:
        raise UserError(f"list takes no arguments (got {' '.join(args)}); see compress-order list --help")
    from omegaconf import OmegaConf

    from compress_order.config.compose import GROUPS
    from compress_order.core.registry import config_group, stage_files
    from compress_order.evaluation.metrics import METRICS

    for group in GROUPS:
        print(f"{group}:")
        for name, path in config_group(group).items():
            print(f"  {name:<22} {_first_comment(path)}")
    from compress_order.config.stages import declared_defaults, stage_defaults

    print("stage:")
    for name, stage in stage_files().items():
        node = OmegaConf.to_container(OmegaConf.load(stage.path))
        defaults = declared_defaults(stage.target)  # from the source: no torch to import for a listing
        if defaults is None:
            defaults = stage_defaults(stage.target)
        node.update({k: v for k, v in defaults.items() if k not in node})
        params = " ".join(f"{k}={v}" for k, v in node.items() if k != "_target_")
        print(f"  {name:<22} {params}")
    from compress_order.evaluation.backend_table import BACKEND_TABLE

    print("backends (eval.backends):")
    for name, (devices, description) in BACKEND_TABLE.items():
        print(f"  {name:<22} {'/'.join(devices):<9} {description}")
    print("metrics:")
    for m in METRICS.values():
        print(f"  {m.name:<22} {'↑' if m.higher_is_better else '↓'} {m.description}")
    return 0


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def cmd_export(args: list[str]) -> int:
    from compress_order.cli.export import export_command

    return export_command(args)


ANALYSIS_COMMANDS = ("table", "analyze", "collect", "frontier", "best")  # compress_order/cli/analysis.py


def cmd_analysis(cmd: str, args: list[str]) -> int:
    from compress_order.cli import analysis

    return analysis.main(cmd, args)


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        return COMMANDS.lookup(cmd)(rest)
    except UserError as e:
        print(f"compress-order: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: finished nodes are in the store already
        detail = (
            str(e)
            if isinstance(e, Interrupted)
            else "interrupted; finished nodes are stored and re-running the same command resumes from them"
        )
        print(f"compress-order: {detail}", file=sys.stderr)
        return 130


COMMANDS: Registry[Callable[[list[str]], int]] = Registry("command")
for _name, _cmd in {
    "run": cmd_run,
    "validate": cmd_validate,
    "list": cmd_list,
    "export": cmd_export,
    **{a: partial(cmd_analysis, a) for a in ANALYSIS_COMMANDS},
}.items():
    COMMANDS.register(_name, _cmd)


def entry() -> None:
    sys.exit(main())
