"""Checkpoint folders a run or an export leaves: a killed writer's half-written folder is removed on the next
save into that run and by export; Ctrl-C during export says what it left."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

from compress_order.cli.main import main
from compress_order.export.checkpoint import remove_stale_writes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tmp(folder: Path, name: str, host: str, pid: int) -> Path:
    d = folder / f".{name}.tmp-{host}-{pid}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"half")
    return d


def test_only_a_dead_local_writers_folder_is_removed(tmp_path, caplog):
    host = socket.gethostname()
    dead = _tmp(tmp_path / "models", "gptq", host, _dead_pid())
    nested = _tmp(tmp_path / "models" / "gptq", "seed-1", host, _dead_pid())
    live = _tmp(tmp_path / "models", "rtn", host, __import__("os").getpid())
    remote = _tmp(tmp_path / "models", "awq", "another-host", _dead_pid())
    with caplog.at_level(logging.WARNING, logger="compress_order.export.checkpoint"):
        removed = remove_stale_writes(tmp_path / "models")
    assert set(removed) == {dead, nested} and not dead.exists() and not nested.exists()
    assert live.exists() and remote.exists()
    assert any("a killed writer" in r.getMessage() and str(dead) in r.getMessage() for r in caplog.records)


def test_a_rerun_into_the_same_folder_and_export_remove_a_killed_save(tiny_overrides, tmp_path):
    over = tiny_overrides + ["stages=[magnitude,rtn]", "bits=4", "group_size=32", "save=true", "eval.backends=none"]
    stale = _tmp(tmp_path / "run" / "models", "magnitude_then_rtn", socket.gethostname(), _dead_pid())
    assert main(["run", *over]) == 0
    assert not stale.exists() and (tmp_path / "run" / "models" / "magnitude_then_rtn" / "config.json").exists()
    stale = _tmp(tmp_path / "run" / "models", "rtn_then_magnitude", socket.gethostname(), _dead_pid())
    assert main(["export", str(tmp_path / "run"), "--order", "magnitude > rtn"]) == 0
    assert not stale.exists()


def test_ctrl_c_during_export_says_what_it_left(tiny_overrides, tmp_path, capsys, monkeypatch):
    from compress_order.cli import export as export_command

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_command, "export_order", interrupted)
    assert main(["export", str(tmp_path / "run"), "--order", "magnitude > rtn"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export left" in err[0] and "run the same export again" in err[0], err
    assert "resumes" not in err[0]
