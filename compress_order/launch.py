"""The Hydra application behind `compress-order run`: single runs, sweeps and launchers."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from compress_order import config  # noqa: F401  (registers the ${asset:} resolver)
from compress_order.errors import UserError
from compress_order.paths import CONF_DIR

FAILURE_FILE = "failed.json"


def _job(cfg: DictConfig) -> None:
    from compress_order.runner import run

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run(cfg, out)
    except UserError as e:
        if not multirun:
            print(f"compress-order: error: {e}", file=sys.stderr)
            sys.exit(2)
        _record_failure(out, hc, str(e), "UserError")
        return
    except Exception as e:  # noqa: BLE001  (a sweep records the failure and goes on)
        if not multirun:
            raise
        _record_failure(out, hc, f"{type(e).__name__}: {e}", traceback.format_exc())
        return
    print((out / "summary.md").read_text())
    print(f"results: {out / 'results.parquet'} (also results.csv, summary.md)")


def _record_failure(out: Path, hc, message: str, detail: str) -> None:
    from compress_order.results import write_text

    print(f"compress-order: job {hc.job.num} failed: {message.splitlines()[0]}", file=sys.stderr)
    record = {"job": hc.job.num, "overrides": list(hc.overrides.task), "error": message, "detail": detail}
    write_text(out / FAILURE_FILE, json.dumps(record, indent=1))


def hydra_main(args: list[str]) -> int:
    sys.argv = ["compress-order"] + list(args)
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_job)
    app()
    return 0
