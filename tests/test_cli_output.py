"""A command-line run shows the progress bar and the results table, not third-party warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# A warning category name, a torch log record ("W1130 12:00:00.000 ... file.py:630]"), or a deprecation notice.
NOISE = re.compile(r"Warning|^[WE]\d{4} |deprecat", re.IGNORECASE)


def _noise(stderr: str) -> list[str]:
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr)]
    return [line for line in lines if NOISE.search(line)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the default filters, as a user has
    return subprocess.run([sys.executable, "-m", "compress_order", *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip


def test_run_stderr_has_no_warnings(tiny_overrides):
    # decode_tokens > 0 steps a KV cache; backends=auto imports torchao: both used to print deprecation notices.
    out = _cli("run", *tiny_overrides, "eval.latency.decode_tokens=2", "eval.backends=auto")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "magnitude > rtn" in out.stdout and "orders:" in out.stderr  # the table and the progress bar
    assert _noise(out.stderr) == []


@pytest.mark.slow  # two fresh worker processes import torch: ~40 s
def test_parallel_sweep_workers_have_no_warnings(tiny_overrides):
    over = [o for o in tiny_overrides if not o.startswith("hydra.run.dir")]
    out = _cli("run", "-m", "hydra/launcher=local_parallel", *over, "bits=3,4", "eval.latency.decode_tokens=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sweep: 2 jobs, 2 ok, 0 failed" in out.stdout
    assert _noise(out.stderr) == []


def test_a_run_leaves_no_log_handler_behind(tiny_overrides):
    """Hydra's job handlers hold the streams of the command that ran; a caller in the same process (here pytest,
    which closes its captured streams) must not find them attached afterwards ('I/O operation on closed file')."""
    import logging

    from compress_order.cli.main import main

    root = logging.getLogger()
    before = list(root.handlers), root.level
    assert main(["run", *tiny_overrides, "eval.backends=none"]) == 0
    assert (list(root.handlers), root.level) == before
