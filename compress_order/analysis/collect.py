"""Gather the tidy rows of every run under some paths: single runs, multirun sweeps, and their failures.

A run folder is any folder holding `results.parquet` or `failed.json` (Hydra puts each sweep job in a numbered
subfolder). Every row gets the folder it came from (`path`) and whether that run is `partial`: it has no
`summary.md` (killed, or still running) or its job failed part-way. A failed job is one row with
status="failed" and its error (from its results, or else from its failed.json), so a table of a sweep never
silently loses a grid point.

A results or samples file that cannot be read (truncated by a killed job, overwritten, not parquet) is skipped
and remembered in `UNREADABLE` (path → reason) for the analysis report. `collect` warns about each one (one line
on stderr) once it knows something readable is left; when nothing is, the command stops with one error line
naming the unreadable files instead (a warning and an error about the same file would say it twice).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import yaml

from compress_order.analysis.tables import learn_stages
from compress_order.core.errors import UserError
from compress_order.core.schema import COLUMNS, RESULTS, SAVED_CONFIG, SUMMARY, entry_label
from compress_order.core.schema import FAILURE_FILE as FAILURE

COLLECTED = [*COLUMNS, "path", "partial"]
# Files skipped since the last collect(): path → why. Samples files found unreadable later (by the bootstrap)
# are added too, so a report lists every file its numbers do not include.
UNREADABLE: dict[str, str] = {}


def read_parquet(path: Path, warn: bool = True) -> pd.DataFrame | None:
    """The table in `path`, or None (the file recorded in UNREADABLE, with a warning if `warn`) when it cannot be
    read."""
    try:
        df = pd.read_parquet(path)
        for col in COLUMNS:  # results written before a column existed
            if col not in df.columns:
                df[col] = None
        # all-null in a run without activation quantization: one numeric dtype, so runs merge on it
        df["act_bits"] = pd.to_numeric(df["act_bits"], errors="coerce")
        df["expert_sparsity"] = pd.to_numeric(df["expert_sparsity"], errors="coerce")
        df["format"] = df["format"].fillna("int").astype(str)  # every grid was an integer one before formats
        # activations were integer (where quantized) before act_format; empty where full precision
        # (as text: an all-null column must not read as float in one run and text in another, or runs cannot merge)
        fmt = df["act_format"].astype(object).where(df["act_format"].notna(), None)
        df["act_format"] = fmt.where(fmt.notna() | df["act_bits"].isna(), "int")
        return df
    except (pa.ArrowException, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if warn and str(path) not in UNREADABLE:
            _warn(str(path), reason)
        UNREADABLE[str(path)] = reason
        return None


def _warn(path: str, reason: str) -> None:
    print(f"compress-order: warning: skipping unreadable '{path}': {reason}", file=sys.stderr)


def run_dirs(root: Path) -> list[Path]:
    """Every run folder under `root` (itself included), in path order.

    A sweep folder gets a combined results.parquet of its numbered job folders at the end of a sweep: it is
    skipped and its jobs are read instead, so no row is counted twice.
    """
    found = {p.parent for name in (RESULTS, FAILURE) for p in root.rglob(name)}
    sweeps = {d.parent for d in found if d.name.isdigit()}
    return sorted(found - sweeps)


def _config_context(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Model, data and targets of a failed job: from Hydra's saved config, else from its override strings."""
    saved = run_dir.joinpath(*SAVED_CONFIG)
    if saved.is_file():
        cfg = yaml.safe_load(saved.read_text()) or {}
        return {
            "model": (cfg.get("model") or {}).get("name"),
            "dataset": (cfg.get("data") or {}).get("name"),
            "stages": ",".join(entry_label(e) for e in cfg.get("stages") or []),
            **{k: cfg.get(k) for k in ("bits", "sparsity", "group_size", "seed")},
        }
    out: dict[str, Any] = {}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in ("bits", "sparsity", "group_size", "seed"):
            out[key] = yaml.safe_load(value)
        elif key in ("model.name", "data.name"):
            out["model" if key.startswith("model") else "dataset"] = value
    return out


def failure_row(run_dir: Path) -> dict[str, Any]:
    record = json.loads((run_dir / FAILURE).read_text())
    ctx = _config_context(run_dir, record.get("overrides") or [])
    return {**ctx, "status": "failed", "error": str(record.get("error", "")), "order": None, "metric": None}


def read_run(run_dir: Path, warn: bool = True) -> pd.DataFrame:
    """The rows of one run folder, plus a failure row when its job failed."""
    failed = (run_dir / FAILURE).is_file()
    frames = []
    if (run_dir / RESULTS).is_file():
        results = read_parquet(run_dir / RESULTS, warn)
        if results is None and not failed:
            return pd.DataFrame(columns=COLLECTED)
        if results is not None:
            frames.append(results.reindex(columns=COLUMNS))
    if failed and not any((f["status"] == "failed").any() for f in frames):  # newer runs write the row themselves
        frames.append(pd.DataFrame([failure_row(run_dir)], columns=COLUMNS))
    df = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
    df["path"] = str(run_dir)
    df["partial"] = failed or not (run_dir / SUMMARY).is_file()
    return df


def collect(paths: list[str | Path]) -> pd.DataFrame:
    """One tidy frame (COLUMNS + path, partial) from run folders, sweep folders, or previously collected files.

    Unreadable files are skipped with a warning each (see UNREADABLE); when no readable rows are left, one
    UserError naming them.
    """
    UNREADABLE.clear()
    frames = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"'{p}' does not exist; pass run or multirun folders (or a collected .parquet/.csv)")
        if p.is_file():
            frames.append(_read_file(p, warn=False))
            continue
        dirs = run_dirs(p)
        if not dirs:
            raise UserError(f"no {RESULTS} or {FAILURE} under '{p}'")
        frames.extend(read_run(d, warn=False) for d in dirs)
    frames = [f for f in frames if not f.empty]
    if not frames:
        raise UserError(_nothing_readable() if UNREADABLE else "no result rows under " + ", ".join(map(str, paths)))
    for path, reason in UNREADABLE.items():  # warned only now: some rows are left to show
        _warn(path, reason)
    df = pd.concat(frames, ignore_index=True)
    df["partial"] = df["partial"].astype(bool)
    learn_stages(df)
    return df


def _nothing_readable(shown: int = 3) -> str:
    """The one error line when every results file was unreadable: the files (the first few) and why."""
    items = [f"'{p}' ({why})" for p, why in UNREADABLE.items()]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"no readable results: {len(items)} unreadable file(s): " + "; ".join(items[:shown]) + more


def _read_file(p: Path, warn: bool = True) -> pd.DataFrame:
    """A run's own results file, or a file written by `collect --out`."""
    if p.name == RESULTS:
        return read_run(p.parent, warn)
    if p.suffix not in (".parquet", ".csv"):
        raise UserError(f"'{p}' is not a .parquet or .csv file of results")
    df = read_parquet(p, warn) if p.suffix == ".parquet" else pd.read_csv(p)
    if df is None:
        return pd.DataFrame(columns=COLLECTED)
    missing = [c for c in ("order", "metric", "value", "stages") if c not in df.columns]
    if missing:
        raise UserError(f"'{p}' has no column(s) {', '.join(missing)}: not a results table")
    if "path" not in df.columns:
        df["path"] = str(p.parent)
    if "partial" not in df.columns:
        df["partial"] = False
    return df.reindex(columns=COLLECTED)


def describe(df: pd.DataFrame) -> str:
    """One line per kind of run: how many runs, rows, failures and partial runs were found."""
    runs = df.groupby("path", sort=False).agg(
        partial=("partial", "first"), failed=("status", lambda s: (s == "failed").any())
    )
    n_ok = int((df["status"] == "ok").sum())
    skipped = f", {len(UNREADABLE)} unreadable file(s) skipped" if UNREADABLE else ""
    return (
        f"{len(runs)} run(s), {n_ok} result row(s); {int(runs['failed'].sum())} failed, "
        f"{int(runs['partial'].sum())} partial{skipped}"
    )
