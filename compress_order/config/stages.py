"""Stage loading: `stages=[magnitude, rtn]` names files of the `conf/stage/` group.

A stage's parameters, their defaults and types are declared once, by its class's `__init__` (value checks there
too, with the root config's ranges from compress_order/core/specs.py for the settings it binds); its yaml names the
class, binds parameters to the root config (`bits: ${bits}`) and sets only what differs from the class's defaults. A resolved stage config holds every parameter, the defaults filled in.

An entry is a name, or a mapping with `name` plus overrides (`{name: magnitude, sparsity: 0.3}`), so one
method can appear twice with split budgets. Each entry's yaml is resolved against the root config, so
`${bits}` and `${sparsity}` reach every stage, then instantiated through its `_target_`.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from compress_order.core.errors import UserError, choices
from compress_order.core.registry import stage_files
from compress_order.core.schema import entry_label, entry_name_overrides
from compress_order.core.settings import StageSpec, frozen_mapping

if TYPE_CHECKING:
    from compress_order.stages.base import Stage


def _check_format(sc: dict, fmt: Any) -> None:
    """A quantizing stage rounds onto the run's number format, or the run is refused (never silently INT)."""
    if fmt == "int" or "format" in sc:
        return
    from hydra.utils import get_object

    if getattr(get_object(sc["_target_"]), "kind", None) in ("quantize", "joint"):
        raise UserError(
            f"stage '{sc['label']}' rounds onto integer grids only; format={fmt} needs a stage that "
            f"takes a format (rtn, gptq, awq, rtn_mixed, sparsegpt_gptq) or format=int"
        )


def stage_configs(cfg: DictConfig, key: str = "stages") -> list[StageSpec]:
    """Every entry of `cfg[key]`, in list order, resolved against the root config with the class's defaults filled
    in; the label rule and each quantizer's number format checked (the class's own checks: `build_stage`)."""
    root = OmegaConf.to_container(cfg, resolve=False)
    entries = root.get(key) or []  # names, or plain mappings
    if not isinstance(entries, list):  # `stages=rtn` would be read letter by letter
        raise UserError(f"{key}={entries} must be a list, e.g. {key}=[{entries}]")
    if not entries and key == "stages":
        raise UserError(f"the stage list is empty; choose from: {choices(stage_files())}")
    out = []
    for entry in entries:
        name, overrides = entry_name_overrides(entry)
        node = OmegaConf.load(stage_files().lookup(name).path)
        _check_params(name, node, overrides)
        node_keys = [k for k in node if k != "_target_"]  # what the yaml sets, beside the class's defaults
        node = OmegaConf.merge(node, overrides)
        # Resolve the stage's ${...} against the root config (bits, sparsity, group_size, ...).
        tmp = OmegaConf.create({**{k: v for k, v in root.items() if k != "hydra"}, "_stage_": node})
        resolved = OmegaConf.to_container(tmp["_stage_"], resolve=True)
        resolved.pop("label", None)
        resolved.update({k: v for k, v in stage_defaults(resolved["_target_"]).items() if k not in resolved})
        resolved.update(name=name, label=entry_label(entry))
        _check_format(resolved, root.get("format", "int"))
        _check_applicable(resolved, set(overrides) | set(node_keys))
        out.append(resolved)
    labels: dict[str, dict] = {}
    for sc in out:
        if sc["label"] in labels and labels[sc["label"]] != sc:
            raise UserError(f"two different stages share the label '{sc['label']}'; give one a distinct label")
        labels[sc["label"]] = sc
    return [_spec(sc) for sc in out]


def _check_applicable(sc: dict, explicit: set[str]) -> None:
    """A setting given explicitly (in the entry, or bound by the stage's yaml) that the stage cannot apply is
    refused; a default the stage adapts is not (stages/base.py Stage.inapplicable)."""
    from compress_order.config.validate import target_object

    params = {k: v for k, v in sc.items() if k not in ("_target_", "name", "label")}
    for key, why in target_object(sc["_target_"]).inapplicable(params).items():
        if key in explicit:
            value = str(sc[key]).lower() if isinstance(sc[key], bool) else sc[key]
            raise UserError(f"stage '{sc['label']}': {key}={value} cannot apply: {why}")


def _spec(sc: dict) -> StageSpec:
    params = {k: v for k, v in sc.items() if k not in ("_target_", "name", "label")}
    return StageSpec(sc["name"], sc["label"], sc["_target_"], frozen_mapping(params))


def stage_defaults(target: str) -> dict[str, Any]:
    """The parameters a stage class declares with a default (its `__init__` and the base initializers its **kw
    reaches), naming keys excepted; tuples as lists, as a config holds them."""
    from compress_order.config.validate import target_object

    out: dict[str, Any] = {}
    for cls in target_object(target).__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        for p in params:
            if p.default is not p.empty and p.name not in ("name", "label") and p.kind is p.POSITIONAL_OR_KEYWORD:
                out.setdefault(p.name, list(p.default) if isinstance(p.default, tuple) else p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def declared_defaults(target: str) -> dict[str, Any] | None:
    """`stage_defaults(target)` read from the stage modules' source instead of importing them (and torch with
    them), for `compress-order list`; None where the source does not say it plainly (a base class from outside
    the package, an `__init__` not written as a def, a default that is not a literal): import then."""
    module, _, name = target.rpartition(".")
    mro = _source_mro(module, name)
    if mro is None:
        return None
    out: dict[str, Any] = {}
    for cls in mro:
        inits = [n for n in cls.body if _binds(n, "__init__")]
        if not inits:
            continue
        init = inits[-1]
        if not isinstance(init, ast.FunctionDef) or init.decorator_list:
            return None
        a = init.args
        positional = a.posonlyargs + a.args
        defaults = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults) :]], a.defaults))
        for p in a.args:  # positional-or-keyword, as stage_defaults reads them
            if p.arg in defaults and p.arg not in ("name", "label"):
                try:
                    value = ast.literal_eval(defaults[p.arg])
                except ValueError:
                    return None
                out.setdefault(p.arg, list(value) if isinstance(value, tuple) else value)
        if a.kwarg is None:
            return out
    return out


def _binds(node: ast.stmt, name: str) -> bool:
    """Whether a class-body statement defines `name`."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


@lru_cache(maxsize=None)
def _source_classes(module: str) -> tuple[dict[str, ast.ClassDef], dict[str, str]] | None:
    """A package module's top-level classes and the names it imports (`from m import x`: x -> "m.x")."""
    if module.split(".")[0] != __name__.split(".")[0]:
        return None
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    imported = {
        a.asname or a.name: f"{n.module}.{a.name}"
        for n in tree.body
        if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module
        for a in n.names
    }
    return classes, imported


def _source_mro(module: str, name: str) -> list[ast.ClassDef] | None:
    """The class's method resolution order (C3, `object` left out), each class as its source; None where a
    base is not a class of the package's source."""
    found = _source_classes(module)
    if found is None:
        return None
    classes, imported = found
    if name not in classes:
        return _source_mro(*imported[name].rsplit(".", 1)) if name in imported else None
    cls = classes[name]
    if cls.keywords or not all(isinstance(b, ast.Name) for b in cls.bases):
        return None  # a metaclass, or a base written as an expression
    bases = [_source_mro(module, b.id) for b in cls.bases]  # type: ignore[attr-defined]
    if any(b is None for b in bases):
        return None
    seqs = [list(b) for b in bases if b] + [[b[0] for b in bases if b]]
    mro = [cls]
    while any(seqs):
        head = next((s[0] for s in seqs if s and not any(s[0] in t[1:] for t in seqs)), None)
        if head is None:
            return None  # no consistent order (Python would refuse the class)
        mro.append(head)
        seqs = [s[1:] if s and s[0] is head else s for s in seqs]
    return mro


def _check_params(name: str, node: DictConfig, overrides: dict) -> None:
    """A stage entry may set only parameters its class takes: a typo must not run with the default value."""
    from compress_order.config.validate import target_params, unknown_key

    params = target_params(str(node.get("_target_")))
    if params is None:
        return
    valid = (params | {"label"}) - {"name"}
    for key in [k for k in node if k != "_target_"] + list(overrides):
        if key not in valid:
            raise unknown_key(key, valid, "parameter", f" for stage '{name}'")


def stage_class(spec: StageSpec) -> type[Stage]:
    from hydra.utils import get_object

    return get_object(spec.target)


def is_calibrated(spec: StageSpec) -> bool:
    """Whether a stage's class reads calibration statistics (its result depends on the seed)."""
    return getattr(stage_class(spec), "needs", None) is not None


def build_stage(spec: StageSpec) -> Stage:
    """Instantiate one stage; its constructor's checks raise UserError."""
    from compress_order.core.instantiate import build

    return build(spec.node())
