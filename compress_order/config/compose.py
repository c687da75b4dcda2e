"""Hydra composition outside a run (validate, list, tests) and the `${asset:...}` resolver."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from compress_order.config.names import model_name
from compress_order.core.errors import UserError
from compress_order.core.files import check_writable
from compress_order.core.paths import ASSETS_DIR, CONF_DIR
from compress_order.core.registry import config_group
from compress_order.core.schemes import act_format_bits, act_format_granularity, format_bits, format_group
from compress_order.core.settings import RunSettings

OmegaConf.register_new_resolver("asset", lambda rel: str(ASSETS_DIR / rel), replace=True)
# a model's name follows its weights unless model.name is given (names.py)
OmegaConf.register_new_resolver("model_name", model_name, replace=True)
# bits and group_size follow the number format unless given (formats.py)
OmegaConf.register_new_resolver("format_bits", format_bits, replace=True)
OmegaConf.register_new_resolver("format_group", format_group, replace=True)
# act_bits and act_granularity follow the activation format unless given (act.py)
OmegaConf.register_new_resolver("act_format_bits", act_format_bits, replace=True)
OmegaConf.register_new_resolver("act_format_granularity", act_format_granularity, replace=True)

GROUPS = ("model", "data", "eval", "experiment", "hydra/launcher")
# Launcher plugins register their own options (joblib, submitit_slurm, ...): Hydra checks those names.
NAME_CHECKED = ("model", "data", "eval", "experiment")
MAX_COMBINATIONS = 4096


def expand_overrides(overrides: list[str]) -> list[list[str]]:
    """Every combination of a sweep (`bits=3,4 sparsity=0.5,0.7` → 4 lists of plain overrides)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's grammar errors span lines; keep the first
        raise UserError(f"cannot parse overrides: {str(e).strip().splitlines()[0]}") from None
    axes = []
    seen: dict[str, str] = {}
    for o in parsed:
        k = o.key_or_group
        if k in seen:
            raise UserError(f"{k} is given twice ({seen[k]} and {o.input_line}); give it once (a sweep: {k}=a,b)")
        seen[k] = o.input_line
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
        group = o.key_or_group.lstrip("+~")
        if group in NAME_CHECKED and o.value_type is not None and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for v in values:
                if isinstance(v, str) and v != "null":
                    config_group(group).lookup(v)
    combos = [list(c) for c in itertools.product(*axes)]
    if len(combos) > MAX_COMBINATIONS:
        raise UserError(f"the sweep has {len(combos)} combinations, more than {MAX_COMBINATIONS}")
    return combos or [[]]


def no_sweep(overrides: list[str]) -> None:
    """Without -m a comma value is neither a list nor a sweep (Hydra's "Ambiguous value"): one line naming both."""
    expand_overrides(overrides)  # a line Hydra's grammar refuses, as one line
    parsed = OverridesParser.create().parse_overrides(overrides)
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            values = list(o.sweep_string_iterator())
            raise UserError(
                f"{o.input_line} gives {len(values)} values without -m: for a list write {key}=[{','.join(values)}], "
                f"to sweep over them add -m"
            )


def compose_config(overrides: list[str], conf_dir: Path = CONF_DIR, hydra: bool = False) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `compress-order run` would (without running)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0]
        bad = re.match(r"Could not override '([^']+)'", first)
        if bad:  # a key the config does not have: name the closest one
            raise _unknown_override(bad.group(1), overrides, conf_dir) from None
        there = re.match(r"Could not append to config\. An item is already at '([^']+)'", first)
        if there:  # `+key=` adds a key; this one is declared already
            key = there.group(1)
            raise UserError(
                f"'{key}' is in the config already: set it with {key}=... (+ adds a key it lacks)"
            ) from None
        raise UserError(first) from None
    finally:
        GlobalHydra.instance().clear()


def _unknown_override(key: str, overrides: list[str], conf_dir: Path) -> UserError:
    """The error for `key=value` when the composed config has no `key`, listing the keys beside it."""
    from compress_order.config.validate import unknown_key

    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") != key]
    parent, _, _ = key.rpartition(".")
    try:
        node = compose_config(rest, conf_dir, hydra=parent.startswith("hydra"))
        node = OmegaConf.select(node, parent) if parent else node
    except UserError:
        node = None
    if not isinstance(node, DictConfig):
        return UserError(f"unknown key '{key}'; the config has no such key (to add one, use +{key}=...)")
    valid = [k for k in node.keys() if k not in ("hydra", "_target_")]
    added = _loader_param(node, key)
    if added is not None:  # a parameter the group's loader takes that its yaml leaves at the loader's default
        return UserError(
            f"'{key}' is not set by this {parent} config (its loader's default applies); to set it: +{key}=..."
        )
    return unknown_key(key, valid)


def _loader_param(node: DictConfig, key: str) -> str | None:
    """`key`'s last part when the `_target_` of `node` (a model or data group) takes it as a parameter."""
    from compress_order.config.validate import target_params

    target = node.get("_target_") if "_target_" in node else None
    if not isinstance(target, str):
        return None
    try:
        params = target_params(target)
    except UserError:
        return None
    name = key.rsplit(".", 1)[-1]
    return name if params is not None and name in params else None


def sweep_params(overrides: list[str]) -> list[str]:
    """The sweep an experiment config declares (`hydra.sweeper.params`), for keys the command line leaves alone."""
    given = {o.partition("=")[0].lstrip("+~") for o in overrides}
    plain = [c[0][0] for c in (expand_overrides([o]) for o in overrides) if len(c) == 1]  # sweeps dropped
    params = compose_config(plain, hydra=True).hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items() if k not in given]


def validate_overrides(overrides: list[str], multirun: bool = False) -> list[RunSettings]:
    """Compose, check and type every combination of a (possibly swept) command line; model-free checks only.

    With `multirun`, the sweep an experiment declares in `hydra.sweeper.params` is expanded too."""
    from compress_order.config.settings import run_settings

    if multirun:
        overrides = list(overrides) + sweep_params(overrides)
    if not multirun:
        no_sweep(overrides)
    combos = expand_overrides(overrides)
    jobs = []
    for combo in combos:
        settings = run_settings(compose_config(combo))
        if settings.store.dir is not None:  # None: no store (every node computed, nothing shared or resumed)
            check_writable(settings.store.dir, "store_dir")
        jobs.append(settings)
    for o in overrides:  # Hydra's output folders are outside the composed job config
        key, _, value = o.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            check_writable(value, key)
    if not any(o.partition("=")[0] in ("hydra.run.dir", "hydra.sweep.dir") for o in overrides):
        check_writable("outputs", "the output folder")
    return jobs


# Run folders written before the package was split into sub-packages name the old flat modules in their saved
# `_target_`s; they load through the new ones.
LEGACY_MODULES = {
    "compress_order.models.": "compress_order.loaders.models.",
    "compress_order.image_models.": "compress_order.loaders.image_models.",
    "compress_order.data.": "compress_order.loaders.text.",
    "compress_order.image_data.": "compress_order.loaders.image_data.",
    "compress_order.wikipedia.": "compress_order.loaders.wikipedia.",
    "compress_order.launch.": "compress_order.cli.launch.",
}


def _current_targets(node: Any) -> Any:
    """A plain config tree with every `_target_` that names a module by its pre-split path renamed."""
    if isinstance(node, dict):
        out = {k: _current_targets(v) for k, v in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            old = next((o for o in LEGACY_MODULES if target.startswith(o)), None)
            if old is not None:
                out["_target_"] = LEGACY_MODULES[old] + target[len(old) :]
        return out
    if isinstance(node, list):
        return [_current_targets(v) for v in node]
    return node


def load_saved(path: Path) -> DictConfig:
    """A run's saved config (`.hydra/config.yaml`), its `_target_`s mapped to today's modules."""
    return OmegaConf.create(_current_targets(OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
