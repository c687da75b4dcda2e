"""A grid pays for each distinct node once: node identity, one store shared by parallel jobs, the cost plan."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from helpers import FakeClock, exit_code

from compress_order.run import identity
from compress_order.config.compose import compose_config
from compress_order.core.paths import PACKAGE_DIR
from compress_order.core.schema import STATS_FILE
from helpers import run
from compress_order.run.store import NodeStore
from compress_order.evaluation.metrics import METRICS

THREE = "stages=[magnitude,rtn,{name:magnitude,sparsity:0.8,label:more}]"  # 1 + 3 + 6 + 6 = 16 nodes



def _values(df: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.Series:
    """Deterministic metrics of every node (timing and memory are measurements, not part of a node's identity)."""
    keep = df[(df["backend"] == "dense-simulated") & ~df["metric"].map(lambda m: METRICS[m].measured)]
    return keep.set_index([*by, "order", "metric"])["value"].sort_index()


def _stats(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob(STATS_FILE))]


def _base(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("hydra.run.dir")] + ["eval.backends=none"]


def test_a_grid_evaluates_each_distinct_node_once(tiny_overrides, tmp_path, capsys):
    grid = ["bits=3,4", "sparsity=0.5,0.7"]
    assert exit_code(["validate", "-m", *_base(tiny_overrides), *grid]) == 0
    # dense once, magnitude at 2 sparsities, rtn at 2 widths, 2 orders × 4 settings
    assert "plan: 4 job(s), 20 nodes, 13 distinct, 0 stored; to do: 16 stage applications, 13 evaluations" in capsys.readouterr().out
    assert exit_code(["run", "-m", *_base(tiny_overrides), *grid]) == 0
    shared = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    stats = _stats(tmp_path / "sweep")
    assert len(stats) == 4 and sum(s["evaluations"] for s in stats) == 13
    assert sum(s["from_store"] for s in stats) == 20 - 13
    # the same grid with no store: every job computes all of its nodes; values are equal, value for value
    alone = [o for o in _base(tiny_overrides) if not o.startswith(("store_dir", "hydra.sweep.dir"))]
    assert exit_code(["run", "-m", *alone, "store_dir=null", f"hydra.sweep.dir={tmp_path / 'alone'}", *grid]) == 0
    assert sum(s["evaluations"] for s in _stats(tmp_path / "alone")) == 20
    unshared = pd.read_parquet(tmp_path / "alone" / "results.parquet")
    by = ("bits", "sparsity")
    pd.testing.assert_series_equal(_values(shared, by), _values(unshared, by))
    assert exit_code(["validate", "-m", *_base(tiny_overrides), *grid]) == 0
    assert "20 nodes, 13 distinct, 13 stored; to do: 0 stage applications, 0 evaluations" in capsys.readouterr().out


def test_two_jobs_on_one_store_compute_each_node_once(tiny_overrides, tmp_path):
    cmd = [sys.executable, "-m", "compress_order", "run", *_base(tiny_overrides), THREE]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen([*cmd, f"hydra.run.dir={tmp_path / f'job{i}'}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-1500:]
    stats = [json.loads((tmp_path / f"job{i}" / STATS_FILE).read_text()) for i in range(2)]
    assert sum(s["evaluations"] for s in stats) == 16, stats
    a, b = (pd.read_parquet(tmp_path / f"job{i}" / "results.parquet") for i in range(2))
    assert a["order"].nunique() == b["order"].nunique() == 16
    assert not a.duplicated(["order", "metric", "backend"]).any()
    pd.testing.assert_series_equal(_values(a), _values(b))
    store = tmp_path / "store"
    assert len(list(store.rglob("*.json"))) == 16 and not list(store.rglob("*.claim"))


def test_code_identity_follows_python_source_only(tmp_path):
    copy = tmp_path / "compress_order"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    before = identity.code_identity(copy)["source"]
    (copy / "conf_note.yaml").write_text("a: 1\n")
    (copy / "README.md").write_text("notes\n")
    assert identity.code_identity.__wrapped__(copy)["source"] == before  # non-code files do not count
    stage = copy / "stages" / "magnitude.py"
    stage.write_text(stage.read_text() + "\n# an edit\n")
    assert identity.code_identity.__wrapped__(copy)["source"] != before


def test_a_code_change_invalidates_stored_nodes(tiny_overrides, tmp_path, monkeypatch):
    cfg = compose_config(tiny_overrides + ["eval.backends=none"])
    run(cfg, tmp_path / "a")
    run(compose_config(tiny_overrides + ["eval.backends=none"]), tmp_path / "b")
    assert json.loads((tmp_path / "b" / STATS_FILE).read_text())["evaluations"] == 0
    real = identity.code_identity()
    monkeypatch.setattr(identity, "code_identity", lambda *a: {**real, "source": "edited"})
    run(compose_config(tiny_overrides + ["eval.backends=none"]), tmp_path / "c")
    assert json.loads((tmp_path / "c" / STATS_FILE).read_text())["evaluations"] == 5


def test_seed_and_calibration_enter_only_calibrated_prefixes(tiny_overrides, tmp_path):
    base = tiny_overrides + ["eval.backends=none", "stages=[magnitude,wanda]"]
    run(compose_config(base), tmp_path / "a")
    run(compose_config(base + ["seed=1", "calibration.nsamples=3"]), tmp_path / "b")
    stats = json.loads((tmp_path / "b" / STATS_FILE).read_text())
    # dense and magnitude are shared; wanda and both orders depend on the calibration draw
    assert stats["from_store"] == 2 and stats["evaluations"] == 3


def test_save_after_a_stored_run_writes_every_full_order(tiny_overrides, tmp_path):
    run(compose_config(tiny_overrides + ["eval.backends=none"]), tmp_path / "a")
    run(compose_config(tiny_overrides + ["eval.backends=none", "save=true"]), tmp_path / "b")
    stats = json.loads((tmp_path / "b" / STATS_FILE).read_text())
    assert stats["evaluations"] == 0 and stats["saved"] == 2
    models = sorted(p.name for p in (tmp_path / "b" / "models").iterdir())
    assert len(models) == 2 and all((tmp_path / "b" / "models" / m / "config.json").is_file() for m in models)


def _claim_file(store: NodeStore, key: str, host: str, pid: int) -> Path:
    path = store._claim_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time()}))
    return path


def test_a_claim_of_a_killed_job_is_taken_over(tiny_overrides, tmp_path, caplog):
    cfg = compose_config(tiny_overrides + ["eval.backends=none"])
    clean = run(cfg, tmp_path / "clean")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = NodeStore(tmp_path / "s2")
    key = clean.loc[clean["order"] == "magnitude > rtn", "node_key"].iloc[0]
    claim = _claim_file(store, key, socket.gethostname(), dead.pid)
    again = run(compose_config(tiny_overrides + ["eval.backends=none", f"store_dir={tmp_path / 's2'}"]), tmp_path / "b")
    assert not claim.exists() and store.get(key) is not None
    assert any("taking over" in r.getMessage() for r in caplog.records)
    pd.testing.assert_series_equal(_values(again), _values(clean))


def test_a_node_claimed_elsewhere_is_waited_for_then_taken_over(tiny_overrides, tmp_path):
    """On a clock that moves only while the run waits, the claim is fresh when the run reaches its node (deferred)
    and goes stale while the run waits at the end (taken over), however long the other nodes take."""
    cfg = compose_config(tiny_overrides + ["eval.backends=none"])
    clean = run(cfg, tmp_path / "clean")
    clock = FakeClock()
    store = NodeStore(tmp_path / "s2", 1.0, clock=clock, sleep=clock.sleep)
    key = clean.loc[clean["order"] == "rtn > magnitude", "node_key"].iloc[0]
    claim = _claim_file(store, key, "another-host", 1)  # alive as far as we can tell: its heartbeat decides
    os.utime(claim, (clock.now, clock.now))
    overrides = tiny_overrides + ["eval.backends=none", f"store_dir={tmp_path / 's2'}", "store_claim_timeout=1"]
    again = run(compose_config(overrides), tmp_path / "b", store=store)
    assert clock.slept and sum(clock.slept) > 1.0  # waited past the timeout, on the fake clock only
    stats = json.loads((tmp_path / "b" / STATS_FILE).read_text())
    assert stats["taken_over"] == 1 and stats["evaluations"] == 5
    pd.testing.assert_series_equal(_values(again), _values(clean))
    assert list(again["order"].unique())[-1] == "rtn > magnitude"  # reported once it was computed
