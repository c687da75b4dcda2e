"""Instantiate a config node through its `_target_`: the one place that turns a config into an object."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from compress_order.core.errors import UserError

# Arguments the pipeline hands a model loader at the call, objects rather than config: never keys of a yaml.
# `data`: the run's data, so a loader can do what needs no weights (tokenizing the text) before loading them.
LATE_ARGS = frozenset({"data"})


def build(node: Any, **late: Any) -> Any:
    """hydra.utils.instantiate, but a UserError raised by the target surfaces as itself (Hydra wraps it). `late`
    (names in LATE_ARGS) go to the target at the call, uncopied: Hydra would turn an object into config."""
    assert set(late) <= LATE_ARGS, set(late) - LATE_ARGS
    target = node.get("_target_", "?")
    try:
        if not late:
            return instantiate(node, _convert_="all")
        make = instantiate({**node, "_partial_": True}, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError):  # a wrong or missing parameter in the yaml or an override
            raise UserError(f"{target}: {cause}") from None
        raise
    try:
        return make(**late)
    except TypeError as e:  # as above: a partial checks its parameters only at the call
        if "argument" not in str(e):
            raise
        raise UserError(f"{target}: {e}") from None
