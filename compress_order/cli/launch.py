"""The Hydra application behind `compress-order run`: single runs, sweeps and launchers.

In a sweep a failing job is recorded (a `failed.json` and a failed row in its results) and the others go on;
the sweep ends with a summary of every job and a non-zero exit when any failed.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import compress_order.config.compose  # noqa: F401  (registers the ${asset:} resolver)
from compress_order.core.errors import UserError
from compress_order.core.paths import CONF_DIR
from compress_order.core.schema import FAILURE_FILE, PREDICTED_CSV, RESULTS, RESULTS_CSV, SUMMARY


def _job(cfg: DictConfig) -> None:
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # before the heavy imports: a launcher may run this job in a fresh process
    from compress_order.config.settings import run_settings
    from compress_order.run.runner import run

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run(run_settings(cfg), out)  # the edge: the typed settings every lower layer reads
    except UserError as e:
        if not multirun:
            print(f"compress-order: error: {e}", file=sys.stderr)
            sys.exit(2)
        _record_failure(cfg, out, hc, str(e), "")
        return
    except Exception as e:  # noqa: BLE001  (a sweep records the failure and goes on)
        if not multirun:
            raise
        _record_failure(cfg, out, hc, f"{type(e).__name__}: {e}", traceback.format_exc())
        return
    print((out / SUMMARY).read_text())
    print(f"results: {out / RESULTS} (also {RESULTS_CSV}, {SUMMARY})")


def _record_failure(cfg: DictConfig, out: Path, hc, message: str, detail: str) -> None:
    from compress_order.core.files import write_text
    from compress_order.run.rows import failure_frame

    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"compress-order: job {hc.job.num} failed: {first}", file=sys.stderr)
    record = {"job": hc.job.num, "overrides": list(hc.overrides.task), "error": first, "detail": detail}
    write_text(out / FAILURE_FILE, json.dumps(record, indent=1))
    failure_frame(_plain(cfg), first, out)


def _plain(cfg: DictConfig) -> dict:
    """The job's config as plain data for its failed row, resolved where it resolves (it may be what failed)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001
        return OmegaConf.to_container(cfg, resolve=False)


class SweepSummary(Callback):
    """Hydra callback (`hydra.callbacks` in config.yaml): after every sweep, however it was started (`-m`, or an
    experiment's `hydra.mode: MULTIRUN`) and whatever the launcher, print its summary and gather its rows.

    Hydra instantiates the callback itself and `hydra.main` returns nothing, so the sweep's exit status is left
    here for the command line."""

    exit_status: ClassVar[int] = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.exit_status = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.exit_status = report_sweep(Path(config.hydra.sweep.dir))


def hydra_main(args: list[str]) -> int:
    """Run the Hydra application on `args` (overrides and Hydra's flags); the exit status of a sweep."""
    SweepSummary.exit_status = 0
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_job)
    argv, sys.argv = sys.argv, ["compress-order", *args]  # hydra.main reads its command line from sys.argv
    try:
        with _job_logging():
            app()
    finally:
        sys.argv = argv
    return SweepSummary.exit_status


@contextmanager
def _job_logging() -> Iterator[None]:
    """Hydra attaches its job's log handlers (console, file) to the root logger for the app's duration; they
    are detached and closed after it, so that no handler outlives the command's streams (a caller in the same
    process, a test, may close them)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
            h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


def report_sweep(sweep_dir: Path) -> int:
    """Print one line per job, gather every job's rows into the sweep folder, exit 1 if any job failed."""
    from compress_order.analysis.collect import read_parquet

    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    frames, failed = [], []
    for job in jobs:
        if (job / FAILURE_FILE).is_file():
            rec = json.loads((job / FAILURE_FILE).read_text())
            failed.append(f"  job {job.name} [{' '.join(rec['overrides'])}]: {rec['error']}")
        rows = read_parquet(job / RESULTS) if (job / RESULTS).is_file() else None  # None: unreadable, warned
        if rows is not None:
            frames.append(rows.assign(job=int(job.name)))
    if frames:
        from compress_order.run.rows import write_results

        write_results(sweep_dir, pd.concat(frames, ignore_index=True))
    print(f"sweep: {len(jobs)} jobs, {len(jobs) - len(failed)} ok, {len(failed)} failed; rows in {sweep_dir}/{RESULTS}")
    _gather_predictions(sweep_dir, jobs)
    if failed:
        print("failed jobs:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


def _gather_predictions(sweep_dir: Path, jobs: list[Path]) -> None:
    """predict_only sweeps: every job's predicted order in one table (sweep_dir/predicted.csv), printed."""

    def fresh(job: Path) -> bool:  # written after the job's results (not left by an earlier run in the folder)
        pred, rows = job / PREDICTED_CSV, job / RESULTS
        return pred.is_file() and (not rows.is_file() or pred.stat().st_mtime >= rows.stat().st_mtime)

    found = [job / PREDICTED_CSV for job in jobs if fresh(job)]
    frames = [f for f in (pd.read_csv(p) for p in found) if not f.empty]
    if not frames:
        return
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(sweep_dir / PREDICTED_CSV, index=False)
    cols = [
        c
        for c in ("model", "dataset", "stages", "bits", "sparsity", "group_size", "intensity", "predicted")
        if df[c].nunique(dropna=False) > 1 or c in ("intensity", "predicted")
    ]
    print(f"predicted orders (PIH, weaker first) → {sweep_dir}/{PREDICTED_CSV}\n{df[cols].to_markdown(index=False)}")
