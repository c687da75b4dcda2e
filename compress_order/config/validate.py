"""Checks of config values that need no model: run before any heavy work, each failure one line.

`check_config` rejects, before a model is loaded, unknown keys (a typo'd `spartsity=0.5`, `eval.max_windowz`, a
model or data key its loader does not take) with the closest valid key where there is one, values outside the
type and range that compress_order/core/specs.py declares for each setting, and settings that contradict each other.
"""

from __future__ import annotations

import difflib
import inspect
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compress_order.core.errors import UserError, choices
from compress_order.core.instantiate import LATE_ARGS
from compress_order.core.paths import CONF_DIR
from compress_order.core.specs import check_settings

# Top-level keys that are config groups (composed from conf/<group>/) rather than values of conf/config.yaml.
GROUP_KEYS = ("model", "data", "eval")


def unknown_key(key: str, valid: list[str] | set[str], noun: str = "key", where: str = "") -> UserError:
    """'unknown key' with the closest valid key, if one is close, and the valid keys."""
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return UserError(f"unknown {noun} '{key}'{where}{hint} valid: {choices(valid)}")


@lru_cache(maxsize=None)
def _schema(rel: str) -> dict:
    """The keys a config file declares (conf/config.yaml, conf/eval/default.yaml) form the schema of its section."""
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / rel), resolve=False)


def target_object(target: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as e:  # noqa: BLE001  (Hydra raises ImportError or its own errors for a bad path)
        raise UserError(f"_target_ '{target}' cannot be imported ({str(e).strip().splitlines()[0]})") from None


def target_params(target: str) -> set[str] | None:
    """Keyword parameters a `_target_` accepts (None: it takes any, **kwargs)."""
    return accepted_params(target_object(target))


def accepted_params(obj: Any) -> set[str] | None:
    """Named parameters of a function, or of a class's __init__ and the base initializers its **kw reaches."""
    names: set[str] = set()
    for init in [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]:
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
        if init is object.__init__:
            break
    return None if not inspect.isclass(obj) else names


def _check_keys(node: dict, schema: dict, prefix: str) -> None:
    """Every key of `node` must be in `schema`; nested mappings that the schema declares are checked too."""
    for k, v in node.items():
        if k not in schema:
            raise unknown_key(f"{prefix}{k}", set(schema))
        if isinstance(schema[k], dict) and isinstance(v, dict) and schema[k]:
            _check_keys(v, schema[k], f"{prefix}{k}.")


def resolved(cfg: DictConfig) -> dict:
    """The whole config resolved, with a failing interpolation (`${oc.env:NOPE}`) as one line naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).strip().splitlines()[0]
        raise UserError(f"cannot resolve {key}: {msg}") from None


def check_config(cfg: DictConfig) -> None:
    """Known keys, each setting's declared type and range, then the rules between settings."""
    c = resolved(cfg)
    c.pop("hydra", None)
    check_settings(c)  # compress_order/core/specs.py; first: it needs no loader module imported
    _check_known_keys(c)
    check_number_format(cfg, c["format"], c["bits"], c["group_size"])
    _check_seeds(c["seeds"], c["replicates"])
    from compress_order.core.schemes import check_act

    check_act(c["act_bits"], c["act_granularity"], c["act_format"], c["format"], c["save"])
    from compress_order.evaluation.lmeval import include_paths

    include_paths(c["eval"]["lm_eval"]["include_path"])  # checked when no task is asked for too
    from compress_order.evaluation.divergence import requested, topk_setting

    # metric names and the KLD scheme's settings, before any model loads
    requested(c["eval"].get("metrics"))
    topk_setting(c["eval"].get("kld_topk"), c["eval"].get("kld_tail_samples", 0))
    if c["predict_only"] and c["save"]:
        raise UserError("save=true writes full orders, which predict_only=true does not compute; drop one of them")
    if c["predict_only"] and c["orders"] is not None:
        raise UserError("orders= lists full orders, which predict_only=true does not compute; drop one of them")


def _check_known_keys(c: dict) -> None:
    """The keys conf/config.yaml and conf/eval/default.yaml declare, and those the model and data loaders take."""
    top = {k: v for k, v in _schema("config.yaml").items() if k not in ("defaults", "hydra")}
    _check_keys({k: v for k, v in c.items() if k not in GROUP_KEYS}, top, "")
    _check_keys(c["eval"], _schema("eval/default.yaml"), "eval.")
    for group in ("model", "data"):
        node = c[group]
        target = node.get("_target_")
        if not target:
            raise UserError(f"{group} config has no _target_; choose one of conf/{group}/")
        params = target_params(target)
        if params is not None:
            params = params - LATE_ARGS  # handed over by the pipeline, never set in a yaml
            _check_keys({k: v for k, v in node.items() if k != "_target_"}, dict.fromkeys(params), f"{group}.")
        _check_declared(target_object(target), node, group)
        check = getattr(target_object(target), "check_node", None)
        if callable(check):  # a loader's own value checks that need no model (e.g. an architecture name)
            check(node)


def _check_declared(loader: Any, node: dict, group: str) -> None:
    """Each loader parameter whose annotation declares its values (`bool`: true or false, `Literal[...]`: its
    options) is checked like a stage's: `+model.bos=maybe` is an error, never `bos=true`."""
    import typing

    from compress_order.core.specs import declared

    try:
        hints = typing.get_type_hints(loader)
    except Exception:  # noqa: BLE001  (annotations that do not resolve declare nothing)
        return
    for key, value in node.items():
        spec = declared(hints[key]) if key in hints else None
        if spec is not None:
            spec.check(value, f"{group}.{key}")


def check_number_format(cfg: DictConfig, fmt: str, bits: int, group_size: int) -> None:
    """The format with the bits and group size it fixes (each quantizing stage's is checked with its config). Every
    format saves as every save_format (compress_order/export/compressed_tensors.py writes the float ones)."""
    from compress_order.core.schemes import check_format

    check_format(fmt, bits, group_size)


def _check_seeds(seeds: Any, replicates: int) -> None:
    """`seeds` (null: seed, seed+1, ... for `replicates`), each its own, agreeing with `replicates`."""
    if seeds is None:
        return
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"seeds={seeds} must be a non-empty list of integers ≥ 0, e.g. [0,1,2], or null")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UserError(f"seeds={seeds} must hold integers ≥ 0 only")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"seeds={seeds} repeats a seed; each replicate needs its own seed")
    if replicates not in (1, len(seeds)):
        raise UserError(f"replicates={replicates} contradicts seeds={seeds}; give one of them")
