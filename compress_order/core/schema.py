"""What a run writes, declared once: the node record, the run folder's file names, the backend names, the labels.

A leaf module (it imports no other module of the package but errors and registry): the runner builds records, the
store checks and keeps them, results turns them into rows and analysis reads the folders, all through this file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from compress_order.core.errors import UserError, choices
from compress_order.core.registry import stage_files

# ------------------------------------------------------------------------------------------------- run folder
RESULTS = "results.parquet"  # one row per (node, metric), rewritten after every node
# the tidy row's columns, in order (run/rows.py writes them, analysis reads them)
COLUMNS = [
    "run_id",
    "model",
    "dataset",
    "stages",
    "stage_list",
    "order",
    "depth",
    "bits",
    "sparsity",
    "group_size",
    "act_bits",
    "format",
    "act_format",
    "expert_sparsity",
    "seed",
    "metric",
    "value",
    "higher_is_better",
    "backend",
    "status",
    "error",
    "config_hash",
    "node_key",
    "git_sha",
    "torch_version",
    "device",
    "timestamp",
    "library_versions",
]
RESULTS_CSV = "results.csv"  # the same rows as CSV
SAMPLES = "samples.parquet"  # per-unit values (windows, images) of each node, for the bootstrap
STATS_FILE = "run_stats.json"  # what a run did: evaluations, stage applications, nodes reused (runner.RunStats)
SUMMARY = "summary.md"  # written last by the runner: its absence means the run did not finish
FAILURE_FILE = "failed.json"  # written by compress_order.cli.launch for a failed sweep job
PREDICTED_MD, PREDICTED_CSV = "predicted.md", "predicted.csv"  # a predict_only run's predicted order
SAVED_CONFIG = (".hydra", "config.yaml")  # the run's resolved config, written by Hydra
MODELS_DIR = "models"  # save=true: one checkpoint folder per full order
SIDECAR, SIDECAR_TENSORS = "compression.json", "compression.safetensors"  # a saved checkpoint's constraints

# ------------------------------------------------------------------------------------------------- backends
SIMULATED = "dense-simulated"  # the evaluated model itself: compressed weights held in dense tensors
DENSE_REFERENCE = "dense("  # prefix of `dense(dtype)`: the dense copy timed beside a packed one
SAVE_FORMATS = ("auto", "compressed-tensors", "dense")  # checkpoint formats of save=true and `export`

# ------------------------------------------------------------------------------------------------- node record
RECORD_VERSION = 1


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class NodeRecord:
    """One evaluated node as the store keeps it: its entries ({metric, value, backend[, higher_is_better, status,
    error]}), per-unit samples by metric, the task's primary metric and protocol, and when it was computed."""

    entries: list[dict]
    samples: dict[str, list[float]] = field(default_factory=dict)
    primary: str = "perplexity"
    protocol: str = ""
    timestamp: str = field(default_factory=utc_now)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> NodeRecord:
        """A record read from the store (checked with `record_problem` first); fields written later default."""
        return cls(
            entries=record["entries"],
            samples=record.get("samples", {}),
            primary=record.get("primary", cls.primary),
            protocol=record.get("protocol", cls.protocol),
            timestamp=record["timestamp"],
        )


def record_problem(record: Any) -> str | None:
    """Why a stored record cannot be trusted (None: it can), the schema only (the store checks its checksum)."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key, kind in (("entries", list), ("timestamp", str), ("checksum", str), ("version", int)):
        if not isinstance(record.get(key), kind):
            return f"field '{key}' is missing or not a {kind.__name__}"
    if record["version"] != RECORD_VERSION:
        return f"record version {record['version']}, expected {RECORD_VERSION}"
    for e in record["entries"]:
        if not (
            isinstance(e, dict)
            and isinstance(e.get("metric"), str)
            and isinstance(e.get("backend"), str)
            and isinstance(e.get("value"), (int, float))
        ):
            return "an entry lacks metric, backend or a numeric value"
    samples = record.get("samples", {})
    if not isinstance(samples, dict) or not all(isinstance(v, list) for v in samples.values()):
        return "field 'samples' is not a mapping of lists"
    return None


# ------------------------------------------------------------------------------------------------- stage labels
def entry_name_overrides(entry: Any) -> tuple[str, dict]:
    """A stage entry (a name, or a mapping with `name` plus overrides) as its name and its overrides."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, Mapping):
        d = dict(entry)
        if "name" not in d:
            raise UserError(f"stage entry {d} has no 'name'; valid names: {choices(stage_files())}")
        return str(d.pop("name")), d
    raise UserError(f"stage entry {entry!r} is neither a name nor a mapping with 'name'")


def entry_label(entry: Any) -> str:
    """The label of a stage entry, the one rule every row, order and table uses: the entry's own `label`, else its
    yaml's, else the name with the overrides it sets (`magnitude(scope=row;sparsity=0.3)`). Labels never hold a
    comma, since a run's stage list is written as comma-joined labels."""
    name, overrides = entry_name_overrides(entry)
    label = overrides.pop("label", None)
    if label is None and name in stage_files():
        label = stage_files()[name].label
    if label is None:
        label = name if not overrides else f"{name}(" + ";".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
    return str(label).replace(",", ";")
