"""Tidy results: one row per (node, metric), written atomically after every node.

Each evaluated node is also kept in the node store (store.py), so a re-run reloads finished nodes.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from compress_order.core.errors import UserError
from compress_order.core.files import atomic_write
from compress_order.core.schema import (
    COLUMNS,
    RESULTS,
    RESULTS_CSV,
    SAMPLES,
    NodeRecord,
    entry_label,
)
from compress_order.evaluation.metrics import METRICS


class RunWriter:
    """Accumulates rows and per-unit samples of one run and rewrites the tidy files after each node."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.rows: list[dict] = []
        self.samples: list[pd.DataFrame] = []
        self._sampled: set[str] = set()

    def add(self, rows: list[dict], samples: dict[str, list[float]], order: str, node_key: str) -> None:
        self.rows.extend(rows)
        if node_key in self._sampled:  # a seed-free node reported for another seed: its units are written once
            samples = {}
        self._sampled.add(node_key)
        for metric, values in samples.items():
            self.samples.append(
                pd.DataFrame(
                    {
                        "order": order,
                        "node_key": node_key,
                        "metric": metric,
                        "unit": np.arange(len(values)),
                        "value": np.asarray(values, dtype=float),
                    }
                )
            )
        self.flush()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def flush(self) -> None:
        df = self.frame()
        write_results(self.out_dir, df)
        if self.samples:
            s = pd.concat(self.samples, ignore_index=True)
            atomic_write(self.out_dir / SAMPLES, lambda tmp: s.to_parquet(tmp, index=False))


def write_results(folder: Path, df: pd.DataFrame) -> None:
    """The tidy rows of a run (or a gathered sweep), as parquet and CSV."""
    atomic_write(folder / RESULTS, lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(folder / RESULTS_CSV, lambda tmp: df.to_csv(tmp, index=False))


def failure_frame(cfg: Any, error: str, out_dir: Path) -> pd.DataFrame:
    """A job that failed before or while running still leaves one row saying so (status=failed)."""

    def get(path: str) -> Any:
        try:
            node = cfg
            for part in path.split("."):
                node = node[part]
            return node
        except Exception:  # noqa: BLE001  (the config itself may be what is broken)
            return None

    row = {c: None for c in COLUMNS}
    row.update(
        model=get("model.name"),
        dataset=get("data.name"),
        bits=get("bits"),
        sparsity=get("sparsity"),
        group_size=get("group_size"),
        act_bits=get("act_bits"),
        act_format=get("act_format"),
        seed=get("seed"),
        status="failed",
        error=error,
        metric="",
        value=float("nan"),
        stages=",".join(_label(s) for s in (get("stages") or [])),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    existing = out_dir / RESULTS
    df = pd.DataFrame([row], columns=COLUMNS)
    if existing.is_file():  # keep the nodes that finished before the failure
        df = pd.concat([pd.read_parquet(existing), df], ignore_index=True)
    write_results(out_dir, df)
    return df


def _label(entry: Any) -> str:
    try:
        return entry_label(entry)
    except UserError:  # the stage list itself may be what failed
        return str(entry).replace(",", ";")


def make_rows(context: dict, order: str, depth: int, node_key: str, record: NodeRecord) -> list[dict]:
    """Rows of one node: one per entry of its record ({metric, value, backend[, higher_is_better, status, error]}).

    Entries carry their metric's direction, so rows rebuilt from the store need no task to register it."""
    return [
        {
            **context,
            "order": order,
            "depth": depth,
            "metric": e["metric"],
            "value": float(e["value"]),
            "higher_is_better": e.get("higher_is_better", METRICS[e["metric"]].higher_is_better)
            if e["metric"]
            else None,
            "backend": e["backend"],
            "status": e.get("status", "ok"),
            "error": e.get("error", ""),
            "node_key": node_key,
            "timestamp": record.timestamp,
        }
        for e in record.entries
    ]
