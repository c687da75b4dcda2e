"""A task couples a loaded model with its data: evaluation, calibration inputs and a latency probe.

The runner only talks to this interface, so language and vision models go through the same pipeline.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Protocol

import numpy as np
from torch import nn

from compress_order.core.registry import Registry
from compress_order.core.settings import RunSettings
from compress_order.loaders.models import LoadedModel


class Task(Protocol):
    primary_metric: str
    protocol: str  # one line saying how the primary metric was measured

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Metric values, and per-unit (window or example) losses for paired bootstrap CIs."""

    def calibration_batches(self) -> list[Any]:
        """Model inputs for calibrated stages: the same for every node of a run."""

    def latency(self, model: nn.Module) -> dict[str, float]:
        """Timing metrics of a fixed-shape forward."""

    @classmethod
    def check(cls, settings: RunSettings, data_type: type | None) -> None:
        """Model-free: UserError for data of another kind and for settings this task would ignore."""

    @classmethod
    def model_checks(cls, settings: RunSettings) -> list[str]:
        """The checks building the task makes once the model and data are loaded, one phrase each."""


TASKS: Registry[Callable[..., Task]] = Registry("model kind")


def register(kind: str) -> Callable:
    """A decorator: the task class for models of `kind` (LoadedModel.kind)."""
    return TASKS.registers(kind)


def _registered() -> Registry[Callable[..., Task]]:
    for mod in pkgutil.iter_modules(__path__):  # each module registers its kinds
        importlib.import_module(f"{__name__}.{mod.name}")
    return TASKS


def build_task(lm: LoadedModel, data: Any, settings: RunSettings) -> Task:
    return _registered().lookup(lm.kind)(lm, data, settings)


def check_task(kind: str, data_type: type | None, settings: RunSettings) -> None:
    """Before any model loads (the configuration edge): what the task of models of `kind` refuses of the settings,
    and data of a type it cannot evaluate (`data_type`: what the data loader returns; None: unknown)."""
    _registered().lookup(kind).check(settings, data_type)


def model_checks(kind: str, settings: RunSettings) -> list[str]:
    return _registered().lookup(kind).model_checks(settings)
