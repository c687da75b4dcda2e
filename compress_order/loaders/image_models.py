"""Image classifiers through timm: `timm_classifier`, named by `_target_` in compress_order/conf/model/*.yaml.

timm is imported inside the loader, so language-model runs do not pay for it.
"""

from __future__ import annotations

import difflib
import pickle
import re
from pathlib import Path
from typing import Any, Sequence

from compress_order.core.errors import UserError, brief
from compress_order.loaders.models import LoadedModel, check_skip

IMAGE_CLASSIFIER = "image_classifier"


def _check_arch(name: str, arch: str) -> None:
    import timm

    if arch.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(arch):
        return
    names = timm.list_models()
    norm = arch.lower().replace("-", "_")
    families = _close_families(norm, names)
    # names of the nearest families first (`vit_tiny_patch16_224` for `vit-tiny`), then the nearest anywhere
    kin = [x for x in names if any(x.startswith(f) for f in families)]
    close = list(
        dict.fromkeys(
            difflib.get_close_matches(norm, kin, n=4, cutoff=0.5)
            + difflib.get_close_matches(norm, names, n=4, cutoff=0.6)
        )
    )[:4]
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    fams = f"families named alike: {', '.join(families)}; " if families else ""
    raise UserError(f"model '{name}': timm has no architecture '{arch}'; {hint}{fams}see timm.list_models('<family>*')")


def _close_families(arch: str, names: list[str], n: int = 3) -> list[str]:
    """timm's family prefixes (a name up to its first '_' or digit: `resnet`, `vit_`) nearest to `arch`'s own."""

    def family(s: str) -> str:
        m = re.match(r"[a-z]+_?", s)
        return m.group(0) if m else s

    fams = sorted({family(x) for x in names})
    return difflib.get_close_matches(family(arch), fams, n=n, cutoff=0.6)


def io_layers(model: Any) -> list[str]:
    """Anchored regexes of the layers timm names as the model's stem conv (`first_conv`) and classifier(s):
    the input and output layers, kept dense by convention (a distilled model has two classifiers)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names: list[str] = []
    for key in ("first_conv", "classifier"):
        v = cfg.get(key)
        names += [v] if isinstance(v, str) else list(v or ())
    return [f"^{re.escape(n)}$" for n in names]


def _check_checkpoint(name: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model '{name}': checkpoint '{path}' does not exist; pass model.checkpoint=/path/to/weights")
    return p


def _read_checkpoint(name: str, path: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from timm.models import load_state_dict

    p = _check_checkpoint(name, path)
    try:  # safetensors, or a torch file holding a state dict (maybe under 'state_dict' / 'model'); no pickled code
        return load_state_dict(str(p), use_ema=False, weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as e:
        raise UserError(f"model '{name}': cannot read checkpoint '{path}' ({brief(e)})") from None


def _mismatch(model: Any, state: dict[str, Any]) -> str | None:
    """Why a state dict does not fit a model (first difference), or None when it does."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            return f"{k} is {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} in the model"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        return f"{len(missing)} weight(s) missing from the checkpoint, first: {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} weight(s) of the checkpoint unknown to the model, first: {unexpected[0]}"
    return None


def _dim_from_checkpoint(model: Any, state: dict[str, Any], cfg_key: str, dim: int) -> int | None:
    """A size the checkpoint implies (classes from the classifier, channels from the first conv), if any."""
    layer = (getattr(model, "pretrained_cfg", None) or {}).get(cfg_key)
    w = state.get(f"{layer}.weight") if isinstance(layer, str) else None
    return int(w.shape[dim]) if w is not None and w.dim() > dim else None


def timm_classifier(
    name: str,
    arch: str,
    checkpoint: str | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
    in_chans: int | None = None,
    skip: Sequence[str] | None = (),
    kwargs: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    group_size: int | None = None,  # the group size that divides this model's layers (top-level default)
    data: Any = None,  # the run's data (the pipeline passes it): nothing of it is needed before the weights
) -> LoadedModel:
    """A timm classifier: weights from `checkpoint` (a state dict or safetensors file) when given, else timm's
    pretrained weights from the hub (`pretrained`), else random. `num_classes` / `in_chans` left null are read
    from the checkpoint. `kwargs` go to timm.create_model; `data_config` overrides timm's preprocessing keys
    (input_size, mean, std, crop_pct, interpolation). `skip` null: the architecture's stem conv and classifier
    (`io_layers`), so any timm name gets the usual dense input and output layers without a list of its own."""
    import timm
    from timm.data import resolve_data_config

    _check_arch(name, arch)
    kw: dict[str, Any] = dict(kwargs or {})
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if in_chans is not None:
        kw["in_chans"] = int(in_chans)

    def create(pretrained: bool, **extra: Any) -> Any:
        try:
            return timm.create_model(arch, pretrained=pretrained, **{**kw, **extra})
        except TypeError as e:  # a kwarg the architecture does not take
            raise UserError(f"model '{name}': {arch} does not accept {e}") from None

    if checkpoint:
        state = _read_checkpoint(name, checkpoint)
        model = create(False)
        own = model.state_dict()
        implied = {}
        sizes = (("num_classes", "classifier", 0, num_classes), ("in_chans", "first_conv", 1, in_chans))
        for key, cfg_key, dim, given in sizes:
            want = _dim_from_checkpoint(model, state, cfg_key, dim)
            if given is None and want is not None and want != _dim_from_checkpoint(model, own, cfg_key, dim):
                implied[key] = want
        if implied:
            model = create(False, **implied)
        why = _mismatch(model, state)
        if why:
            raise UserError(f"model '{name}': checkpoint '{checkpoint}' does not fit {arch}{kw or ''}: {why}")
        model.load_state_dict(state)
    elif pretrained:
        try:
            model = create(True)
        except (OSError, RuntimeError) as e:  # offline: huggingface_hub raises OSError subclasses
            raise UserError(
                f"model '{name}': cannot get pretrained {arch} weights ({brief(e)}); "
                f"pass model.checkpoint=/path/to/weights.safetensors (or .pth)"
            ) from None
    else:
        model = create(False)
    model.eval()  # timm returns train mode: BatchNorm would update its statistics during evaluation
    dc = resolve_data_config(dict(data_config or {}), model=model)
    return LoadedModel(
        model=model,
        kind=IMAGE_CLASSIFIER,
        name=name,
        skip=io_layers(model) if skip is None else list(skip),
        extra={"data_config": dc, "num_classes": int(model.num_classes), "arch": arch},
    )


def _check_timm_node(node: dict[str, Any]) -> None:
    """Config-time check (validate.check_config): an unknown architecture is reported before anything runs."""
    _check_arch(str(node.get("name")), str(node.get("arch")))
    if node.get("skip") is not None:  # null: the architecture's own stem conv and classifier
        check_skip(node["skip"])
    if isinstance(node.get("checkpoint"), str):
        _check_checkpoint(str(node.get("name")), node["checkpoint"])


timm_classifier.check_node = _check_timm_node  # type: ignore[attr-defined]
timm_classifier.kind = IMAGE_CLASSIFIER  # type: ignore[attr-defined]  (the task that evaluates it, before it loads)
