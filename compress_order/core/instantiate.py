"""Instantiate a config node through its `_target_`: the one place that turns a config into an object."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from compress_order.core.errors import UserError


def build(node: Any) -> Any:
    """hydra.utils.instantiate, but a UserError raised by the target surfaces as itself (Hydra wraps it)."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError):  # a wrong or missing parameter in the yaml or an override
            raise UserError(f"{node.get('_target_', '?')}: {cause}") from None
        raise
