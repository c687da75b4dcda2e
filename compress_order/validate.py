"""Checks of config values that need no model: run before any heavy work, each failure one line.

`check_config` is the one place that knows which keys a run reads and what values they may take: unknown keys
(a typo'd `spartsity=0.5`, `eval.max_windowz`, a model or data key its loader does not take) and out-of-range
numbers are rejected here, before a model is loaded, with the closest valid key where there is one.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compress_order.errors import UserError, choices
from compress_order.paths import CONF_DIR

# Top-level keys that are config groups (composed from conf/<group>/) rather than values of conf/config.yaml.
GROUP_KEYS = ("model", "data", "eval")


def resolve_device(name: str, key: str = "device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name} but CUDA is not available here; valid: auto, cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"{key}={name} is unknown; valid: auto, cpu, cuda, cuda:N")


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


def _int(value: Any, key: str, low: int, none_ok: bool = False, what: str = "") -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        allowed = f"an integer ≥ {low}" + (" or null" if none_ok else "")
        raise UserError(f"{key}={value} must be {allowed}{what}")


def _number(value: Any, key: str, low: float, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (value <= low if strict else value < low):
        raise UserError(f"{key}={value} must be a number {'>' if strict else '≥'} {low:g}")


def _fraction(value: Any, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise UserError(f"{key}={value} is outside [0, 1)")


def resolved(cfg: DictConfig) -> dict:
    """The whole config resolved, with a failing interpolation (`${oc.env:NOPE}`) as one line naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).strip().splitlines()[0]
        raise UserError(f"cannot resolve {key}: {msg}") from None


def check_config(cfg: DictConfig) -> None:
    c = resolved(cfg)
    c.pop("hydra", None)
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
            _check_keys({k: v for k, v in node.items() if k != "_target_"}, dict.fromkeys(params), f"{group}.")
        check = getattr(target_object(target), "check_node", None)
        if callable(check):  # a loader's own value checks that need no model (e.g. an architecture name)
            check(node)

    bits = c["bits"]
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise UserError(f"bits={bits} is outside 2-8 (an integer)")
    _fraction(c["sparsity"], "sparsity")
    _fraction(c["expert_sparsity"], "expert_sparsity")  # read by expert_prune only
    gs = c["group_size"]
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs <= 0 and gs != -1):
        raise UserError(f"group_size={gs} must be a positive integer or -1 (per-channel)")
    check_number_format(cfg, c["format"], bits, gs)
    _int(c["seed"], "seed", 0)
    _int(c["replicates"], "replicates", 1, what=" (calibration seeds per run)")
    seeds = c["seeds"]
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise UserError(f"seeds={seeds} must be a non-empty list of integers ≥ 0, e.g. [0,1,2], or null")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise UserError(f"seeds={seeds} must hold integers ≥ 0 only")
        if len(set(seeds)) < len(seeds):
            raise UserError(f"seeds={seeds} repeats a seed; each replicate needs its own seed")
        if c["replicates"] not in (1, len(seeds)):
            raise UserError(f"replicates={c['replicates']} contradicts seeds={seeds}; give one of them")
    _int(c["threads"], "threads", 1, none_ok=True)
    from compress_order.act import check_act

    check_act(c["act_bits"], c["act_granularity"], c["act_format"], c["format"], c["save"])
    _int(c["dense_bits"], "dense_bits", 1)
    cal, ev = c["calibration"], c["eval"]
    _int(cal["nsamples"], "calibration.nsamples", 1)
    _int(cal["seqlen"], "calibration.seqlen", 1, none_ok=True, what=" (null: the evaluation sequence length)")
    _int(ev["batch_size"], "eval.batch_size", 1)
    _int(ev["seqlen"], "eval.seqlen", 1, none_ok=True, what=" (null: model.seqlen)")
    _int(ev["max_windows"], "eval.max_windows", 1, none_ok=True, what=" (null: all windows)")
    _int(ev["max_examples"], "eval.max_examples", 1, none_ok=True, what=" (null: all images)")
    lat = ev["latency"]
    _int(lat["batch"], "eval.latency.batch", 1)
    _int(lat["seqlen"], "eval.latency.seqlen", 1, none_ok=True)
    _int(lat["decode_tokens"], "eval.latency.decode_tokens", 0)
    _int(lat["warmup"], "eval.latency.warmup", 0)
    _int(lat["repeats"], "eval.latency.repeats", 1)
    sc = c.get("state_cache") or {}
    _number(sc.get("max_gb", 1), "state_cache.max_gb", 0)  # checked with the cache off too
    if sc.get("dir") is not None and not isinstance(sc["dir"], str):
        raise UserError(f"state_cache.dir={sc['dir']} must be a folder or null (no cache)")
    _number(c["store_claim_timeout"], "store_claim_timeout", 0)
    from compress_order.schema import SAVE_FORMATS

    if c["save_format"] not in SAVE_FORMATS:
        raise UserError(f"save_format={c['save_format']} is unknown; valid: {', '.join(SAVE_FORMATS)}")
    flags = {"force": c["force"], "save": c["save"], "predict_only": c["predict_only"],
             "calibration.true_sequential": cal["true_sequential"], "calibration.moe_all_experts":
             cal["moe_all_experts"], "eval.word_perplexity": ev["word_perplexity"]}  # fmt: skip
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"{flag}={value} must be true or false")
    _check_lm_eval(ev)
    if c["predict_only"] and c["save"]:
        raise UserError("save=true writes full orders, which predict_only=true does not compute; drop one of them")
    from compress_order.backends import select_backends

    select_backends(ev.get("backends", "auto"), resolve_device(str(c["device"])))
    if cal.get("device") is not None:  # checked whether or not a stage is calibrated
        resolve_device(str(cal["device"]), "calibration.device")
    if ev.get("offload") not in (None, False):
        resolve_device("auto" if ev["offload"] is True else str(ev["offload"]), "eval.offload")
        if resolve_device(str(c["device"])).type != "cpu":  # the runner would place the whole model there first
            raise UserError(f"eval.offload={ev['offload']} streams a model kept in CPU memory; set device=cpu "
                            f"(and calibration.device for calibrated stages)")


def check_number_format(cfg: DictConfig, fmt: str, bits: int, group_size: int) -> None:
    """The format with the bits and group size it fixes (each quantizing stage's is checked with its config)."""
    from compress_order.formats import check_format

    check_format(fmt, bits, group_size)
    if fmt != "int" and cfg.get("save_format") == "compressed-tensors":
        raise UserError(f"save_format=compressed-tensors is written for integer grids only so far; format={fmt} "
                        f"saves as save_format=dense or auto (values exactly on their grids)")  # fmt: skip


def _check_lm_eval(ev: dict) -> None:
    """`eval.tasks` and the `eval.lm_eval.*` settings, checked when no task is asked for too (they are read
    only when one is)."""
    tasks = ev["tasks"]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise UserError(f"eval.tasks={tasks} must be a list of lm-eval task names, e.g. [arc_easy,hellaswag]")
    le = ev["lm_eval"]
    _int(le["num_fewshot"], "eval.lm_eval.num_fewshot", 0, none_ok=True, what=" (null: each task's default)")
    if le["limit"] is not None:
        _number(le["limit"], "eval.lm_eval.limit", 0)
    _int(le["batch_size"], "eval.lm_eval.batch_size", 1)
    _int(le["max_length"], "eval.lm_eval.max_length", 1, none_ok=True, what=" (null: the window length)")
    _int(le["bootstrap_iters"], "eval.lm_eval.bootstrap_iters", 0)
    if not isinstance(le["model_args"], dict):
        raise UserError(f"eval.lm_eval.model_args={le['model_args']} must be a mapping, e.g. {{add_bos_token: true}}")
    from compress_order.lmeval import include_paths

    include_paths(le["include_path"])


def check_writable(path: str, what: str) -> None:
    """Create and write a probe file in the folder (or its first existing ancestor, where it will be created).

    `os.access` says yes to root on any mounted filesystem (read-only, /proc, full disks), so only a real write
    tells whether results can be written there."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{what} '{path}' is not writable ({p} is a file, not a folder); choose another folder")
    try:
        with tempfile.NamedTemporaryFile(dir=p, prefix=".compress-order-probe-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{what} '{path}': the disk is full (checked {p}); free space or choose another folder") from None
        raise UserError(f"{what} '{path}' is not writable (checked {p}: {e.strerror}); choose another folder") from None
