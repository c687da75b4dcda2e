"""Nothing wrong passes silently: damaged data and model files, a damaged node store, Ctrl-C, file modes."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import pandas as pd
import pytest

from helpers import exit_code, held_run, wait_for

from compress_order.config.compose import compose_config
from compress_order.core.errors import UserError
from compress_order.run.store import QUARANTINE, NodeStore
from helpers import run
from compress_order.evaluation.tasks.lm import LMTask
from compress_order.core.files import check_writable
from compress_order.evaluation.metrics import METRICS



def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0] not in keys]


def test_bad_text_files_name_the_file(tiny_overrides, tmp_path, capsys):
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(128, 256)) * 64)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    base = _without(tiny_overrides, "data.valid")
    assert exit_code(["run", *base, f"data.valid={garbage}"]) == 2
    line = _one_line(capsys)
    assert f"valid file '{garbage}' is not UTF-8 text" in line and "\\x" not in line
    assert exit_code(["run", *base, f"data.valid={empty}"]) == 2
    assert f"valid file '{empty}' is empty" in _one_line(capsys)


def test_garbage_dataset_folder_names_the_files(tiny_overrides, tmp_path, capsys):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.raw").write_bytes(bytes(range(128, 256)) * 64)
    base = _without(tiny_overrides, "data.train", "data.valid", "data.name")
    assert exit_code(["run", *base, "data=wikitext2", f"data.path={folder}"]) == 2
    line = _one_line(capsys)
    assert "data 'wikitext2': cannot read" in line and str(folder / "wiki.t") in line


def test_empty_model_folder_says_what_is_expected(tiny_overrides, tmp_path, capsys):
    empty = tmp_path / "model"
    empty.mkdir()
    assert exit_code(["run", *_without(tiny_overrides, "model.path"), f"model.path={empty}"]) == 2
    line = _one_line(capsys)
    assert f"folder '{empty}' has no config.json" in line and "safetensors" in line


def test_a_full_disk_is_found_before_any_work(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="the disk is full"):
        check_writable(str(tmp_path / "out"), "hydra.run.dir")


def _values(df: pd.DataFrame) -> pd.Series:
    """Every node's deterministic metrics (timing and memory are measurements, not part of a result's identity)."""
    keep = df[(df["backend"] == "dense-simulated") & ~df["metric"].map(lambda m: METRICS[m].measured)]
    return keep.set_index(["order", "metric"])["value"].sort_index()


DAMAGE = {
    "random bytes": lambda p: p.write_bytes(os.urandom(300)),
    "empty object": lambda p: p.write_text("{}"),
    "missing fields": lambda p: p.write_text(json.dumps({"entries": []})),
    "bad checksum": lambda p: p.write_text(p.read_text().replace('"value": ', '"value": 1', 1)),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_store_record_is_quarantined_and_recomputed(how, tiny_overrides, tmp_path, caplog):
    cfg = compose_config(tiny_overrides + ["eval.backends=none"])
    clean = run(cfg, tmp_path / "a")
    key = clean.loc[clean["order"] == "magnitude", "node_key"].iloc[0]
    path = NodeStore(tmp_path / "store")._path(key)
    DAMAGE[how](path)
    calls = {"n": 0}
    real = LMTask.evaluate

    def counting(self, model):
        calls["n"] += 1
        return real(self, model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LMTask, "evaluate", counting)
        again = run(cfg, tmp_path / "b")
    assert calls["n"] == 1  # the damaged node alone was recomputed
    moved = list((tmp_path / "store" / QUARANTINE).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(path.name)
    assert any("is damaged" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert NodeStore(tmp_path / "store").get(key) is not None  # rewritten whole
    pd.testing.assert_series_equal(_values(again), _values(clean))


def test_ctrl_c_stops_with_one_line_and_the_rerun_resumes(tiny_overrides, tmp_path):
    store = tmp_path / "store"
    stages = "stages=[magnitude,rtn,{name:magnitude,sparsity:0.8,label:more}]"  # 16 nodes
    cmd = [sys.executable, "-m", "compress_order", "run", *tiny_overrides, stages, "eval.backends=none"]
    held, env = held_run(cmd[3:], at=4, ready=tmp_path / "held")  # ctrl-c while the 4th node evaluates
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.Popen(held, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(tmp_path / "held", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("compress-order")]  # besides the progress bar
    assert proc.returncode == 130, err[-1500:]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err[-1500:]
    assert "interrupted: " in lines[0] and "3 of 16 nodes finished and stored" in lines[0]
    assert "re-running the same command resumes" in lines[0]
    finished = {p.stem: p.stat().st_mtime_ns for p in store.rglob("*.json")}
    again = tmp_path / "again"
    rerun = [a for a in cmd if not a.startswith("hydra.run.dir")] + [f"hydra.run.dir={again}"]
    out = subprocess.run(rerun, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-1500:]
    df = pd.read_parquet(again / "results.parquet")
    assert df["order"].nunique() == 16 and not df.duplicated(["order", "metric", "backend"]).any()
    after = {p.stem: p.stat().st_mtime_ns for p in store.rglob("*.json")}
    assert all(after[k] == t for k, t in finished.items())  # stored nodes reloaded, not recomputed


def test_result_and_store_files_respect_the_umask(tiny_overrides, tmp_path):
    old = os.umask(0o022)
    try:
        run(compose_config(tiny_overrides + ["eval.backends=none"]), tmp_path / "a")
    finally:
        os.umask(old)
    files = [tmp_path / "a" / "results.parquet", tmp_path / "a" / "summary.md", *(tmp_path / "store").rglob("*.json")]
    modes = {stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == {0o644}, {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}


def test_a_damaged_store_record_is_warned_about_on_stderr(tiny_overrides, tmp_path, capsys):
    """The warning once went to stdout only (Hydra's console handler), mixed into the results a pipe reads."""
    base = _without(tiny_overrides, "hydra.run.dir") + ["stages=[rtn]", "eval.backends=none"]
    assert exit_code(["run", *base, f"hydra.run.dir={tmp_path / 'a'}"]) == 0
    record = next(p for p in (tmp_path / "store").rglob("*.json") if p.parent.name != QUARANTINE)
    record.write_text("garbage")
    capsys.readouterr()
    assert exit_code(["run", *base, f"hydra.run.dir={tmp_path / 'b'}"]) == 0
    captured = capsys.readouterr()
    assert "is damaged" in captured.err and str(record) in captured.err
    assert "is damaged" not in captured.out and "WARNING" not in captured.out
    assert "[INFO] - plan: " in captured.out  # information stays where it was
