"""A model's name follows its weights: the `${model_name:...}` resolver of conf/model/*.yaml.

A model config's `name` labels every row and the summary of its runs. Its yaml declares the name of its own
weights (`name: ${model_name:llama2_7b,llama-2-7b}`: the yaml's stem, then the name). When a run points the
config at other weights — another `model.path`, `model.gguf_file`, `model.checkpoint`, `model.arch` or
`model.revision` — without giving `model.name`, the declared name would describe a model that was not run, and a
table over two such runs would mix two models under one name. The name is then the weights' own: a hub id as
given, a local path made absolute (two folders with the same last component stay apart), the architecture of a
timm model, `@revision` for another revision. A `model.name=` given on the command line replaces the
interpolation and is kept as given.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from omegaconf import OmegaConf

from compress_order.core.paths import CONF_DIR

# The keys of a model config that choose its weights, in the order their value names the model.
WEIGHT_KEYS = ("checkpoint", "path", "gguf_file", "arch", "revision")


@lru_cache(maxsize=None)
def declared_weights(stem: str) -> dict[str, Any] | None:
    """The weight keys conf/model/<stem>.yaml declares, resolved (None: no such file, or they do not resolve)."""
    path = CONF_DIR / "model" / f"{stem}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    try:
        return {k: node[k] for k in WEIGHT_KEYS if k in node}
    except Exception:  # noqa: BLE001  (an environment variable the default path reads is unset)
        return None


def _where(value: Any) -> Any:
    """A path as the file system finds it (absolute, `~` expanded); a hub id or anything else as it is."""
    if not isinstance(value, str):
        return value
    local = value.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(value))
    return os.path.abspath(os.path.expanduser(value)) if local else value


def model_name(stem: str, name: str, _parent_: Any) -> str:
    """`name` for the weights conf/model/<stem>.yaml declares; for other weights, a name of their own."""
    declared = declared_weights(stem)
    if declared is None:
        return name
    given = {k: _parent_.get(k) for k in WEIGHT_KEYS if k in _parent_}
    changed = {k for k in given if _where(given[k]) != _where(declared.get(k))}
    if not changed:
        return name
    if given.get("checkpoint") is not None and "checkpoint" in changed:
        own = _where(given["checkpoint"])
    elif changed & {"path", "gguf_file"} and given.get("path") is not None:
        own = _where(given["path"])
        if given.get("gguf_file"):
            own = f"{own}/{given['gguf_file']}"
    elif "arch" in changed:
        own = given["arch"]
    else:
        own = name
    revision = given.get("revision")
    return f"{own}@{revision}" if "revision" in changed and revision is not None else str(own)
