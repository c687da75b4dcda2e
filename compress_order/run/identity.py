"""What determines a node's result: the one rule behind every store key.

A node (the dense model, or the model after a prefix of stages) is keyed by
- the model and data configs (the embedded assets' folder written relative, so every checkout shares keys),
- the evaluation settings, the device and `dense_bits` (they change the node's metrics; `kld` is measured against
  the dense model of these same settings, its reference scheme being `eval` keys, so it needs nothing more),
- the resolved parameters of each stage of its prefix, in order (a label is a name, not identity: `bits` and
  `sparsity` enter only through the stages that interpolate them),
- the calibration settings and the seed, only when the prefix holds a calibrated stage (one whose class `needs`
  statistics); data-free prefixes (dense, magnitude, RTN and their orders) are shared by every seed,
- the code: a hash of the package's Python source plus the versions of the libraries that change numbers.

So a grid computes each distinct node once: the dense model and each single stage at a given setting are shared
by every job that reaches them, and an edit to the package's code (not to a README or a config) invalidates all.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from hydra.utils import get_object

from compress_order.core.paths import ASSETS_DIR, PACKAGE_DIR
from compress_order.core.settings import Calibration, RunSettings, StageSpec, plain

# The libraries whose versions shape a result: part of every node key and of every row (`library_versions`).
LIBRARIES = ("torch", "transformers", "timm", "torchao", "datasets", "hydra-core", "numpy", "compressed-tensors")


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=4)
def code_identity(package_dir: Path = PACKAGE_DIR) -> dict:
    """Hash of every .py file of the package (path and bytes) and the versions of `LIBRARIES`."""
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        h.update(str(path.relative_to(package_dir)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"source": h.hexdigest(), "libraries": library_versions()}


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """The installed version of each of `LIBRARIES` (None: not installed)."""
    out: dict[str, str | None] = {}
    for pkg in LIBRARIES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _portable(value: Any) -> Any:
    """Paths inside the embedded assets folder written relative to it (the same key in every checkout)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and value.startswith(str(ASSETS_DIR)):
        return "${asset:" + value[len(str(ASSETS_DIR)) :].lstrip("/") + "}"
    return value


def base_identity(settings: RunSettings) -> dict:
    """What every node of a run shares."""
    ident = {
        "model": settings.model.node(),
        "data": settings.data.node(),
        "eval": plain(settings.eval),
        "device": settings.device,
        "dense_bits": settings.dense_bits,
        "code": code_identity(),
    }
    if settings.act is not None:  # quantized activations change every node, the dense one included
        ident["act"] = {"bits": settings.act.bits, "granularity": settings.act.granularity}
        if settings.act.format is not None:  # only then: integer runs keep their keys
            ident["act"]["format"] = settings.act.format
    return _portable(ident)


def stage_identity(spec: StageSpec) -> dict:
    """What a stage does: its class and parameters (a label is a name, not identity)."""
    return _portable({"_target_": spec.target, **plain(spec.params)})


def node_key(base: dict, prefix: list[StageSpec], calibrated: bool, calibration: Calibration, seed: int) -> str:
    """The store key of the node reached by applying `prefix` to the dense model."""
    classes = [get_object(s.target) for s in prefix]
    kinds = tuple(cls.kind for cls in classes)
    steps = [
        _portable({"_target_": s.target, **plain(cls.identity(s.params, kinds[:i]))})
        for i, (s, cls) in enumerate(zip(prefix, classes))
    ]
    ident: dict[str, Any] = {"base": base, "prefix": steps}
    if calibrated:
        ident["calibration"] = plain(calibration)
        ident["seed"] = seed
    return digest(ident)
