"""Sweeps that survive: failures recorded, resume after a crash or SIGKILL, launchers, validation, list."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest

from helpers import exit_code, held_run, terminal_lines, wait_for

from compress_order.cli.main import main
from compress_order.config.compose import compose_config
from helpers import run
from compress_order.evaluation.tasks.lm import LMTask



def _sweep_overrides(tiny_overrides: list[str]) -> list[str]:
    """The fixture's overrides without its run folder (for sweeps, or to give another)."""
    return [o for o in tiny_overrides if not o.startswith("hydra.run.dir")]


def test_failing_job_is_recorded_and_the_sweep_finishes(tiny_overrides, tmp_path, capsys):
    import shutil

    base = [o for o in _sweep_overrides(tiny_overrides) if not o.startswith("model.path")]
    good = next(o for o in tiny_overrides if o.startswith("model.path")).split("=", 1)[1]
    # a missing folder is refused before the sweep starts (validate's checks); damaged weights only when loaded
    broken = tmp_path / "broken_model"
    shutil.copytree(good, broken)
    (broken / "config.json").write_text("{not json")
    rc = exit_code(["run", "-m", *base, f"model.path={good},{broken}"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "sweep: 2 jobs, 1 ok, 1 failed" in captured.out and str(broken) in captured.err
    sweep = tmp_path / "sweep"
    df = pd.read_parquet(sweep / "results.parquet")
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1 and "cannot load" in failed["error"].iloc[0] and failed["job"].iloc[0] == 1
    assert (df[df["job"] == 0]["status"] != "failed").all() and df[df["job"] == 0]["order"].nunique() == 5
    assert (sweep / "1" / "failed.json").is_file()


def test_resume_after_a_crash_recomputes_only_missing_nodes(tiny_overrides, tmp_path, monkeypatch):
    cfg = compose_config(tiny_overrides + ["stages=[magnitude,rtn,{name:magnitude,sparsity:0.8,label:more}]"])
    calls = {"n": 0}
    real = LMTask.evaluate

    def flaky(self, model):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(self, model)

    monkeypatch.setattr(LMTask, "evaluate", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, tmp_path / "a")
    partial = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert partial["order"].nunique() == 3  # everything finished before the crash is on disk
    calls["n"] = -100  # no more crashes
    df = run(cfg, tmp_path / "b")
    assert df["order"].nunique() == df["node_key"].nunique() == 16  # three distinct labels: 1 + 3 + 6 + 6
    assert calls["n"] == -100 + 16 - 3  # only the nodes missing after the crash were evaluated
    assert not df.duplicated(["order", "metric", "backend"]).any()


def test_sigkill_loses_at_most_the_node_in_flight(tiny_overrides, tmp_path):
    store = tmp_path / "store"
    stages = "stages=[magnitude,rtn,{name:magnitude,sparsity:0.8,label:more}]"  # 1 + 3 + 6 + 6 = 16 nodes
    cmd = [sys.executable, "-m", "compress_order", "run", *tiny_overrides, stages]
    held, env = held_run(cmd[3:], at=3, ready=tmp_path / "held")  # killed while the 3rd node evaluates
    proc = subprocess.Popen(held, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    wait_for(tmp_path / "held", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem: p.stat().st_mtime_ns for p in store.rglob("*.json")}
    assert len(finished) == 2, proc.stderr.read()[-1500:]
    assert not list(store.rglob("*.tmp"))  # no torn files pose as results
    again = tmp_path / "again"
    rerun = [a for a in cmd if not a.startswith("hydra.run.dir")] + [f"hydra.run.dir={again}"]
    out = subprocess.run(rerun, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    df = pd.read_parquet(again / "results.parquet")
    assert df["order"].nunique() == 16 and not df.duplicated(["order", "metric", "backend"]).any()
    after = {p.stem: p.stat().st_mtime_ns for p in store.rglob("*.json")}
    assert all(after[k] == t for k, t in finished.items())  # finished nodes were reloaded, not recomputed
    assert len(after) == 16


def test_joblib_launcher_runs_a_grid_and_collects(tiny_overrides, tmp_path, capsys):
    rc = exit_code(["run", "-m", "hydra/launcher=local_parallel", *_sweep_overrides(tiny_overrides), "bits=3,4"])
    assert rc == 0, capsys.readouterr().err[-1500:]
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert sorted(df["bits"].unique()) == [3, 4] and set(df["job"]) == {0, 1}
    assert (df["status"] != "failed").all() and df.groupby("job")["order"].nunique().eq(5).all()


@pytest.mark.slow
def test_submitit_local_launcher(tiny_overrides, tmp_path, capsys):
    rc = exit_code(["run", "-m", "hydra/launcher=local_submitit", *_sweep_overrides(tiny_overrides), "sparsity=0.5,0.7"])
    assert rc == 0, capsys.readouterr().err[-1500:]
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert sorted(df["sparsity"].unique()) == [0.5, 0.7]


def test_unwritable_output_and_disk_full(tiny_overrides, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert exit_code(["run", *_sweep_overrides(tiny_overrides), f"hydra.run.dir={blocker}/out"]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert exit_code(["validate", f"store_dir={blocker}/store"]) == 2
    assert "store_dir" in capsys.readouterr().err

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(".parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    assert exit_code(["run", *tiny_overrides]) == 2
    err = terminal_lines(capsys.readouterr().err)  # the progress bar is cleared before the error
    assert len(err) == 1 and "disk full while writing" in err[0], err


def test_conflicting_overrides(capsys):
    assert exit_code(["validate", "bits=3", "bits=4"]) == 2
    assert "bits is given twice" in capsys.readouterr().err


def test_list_names_every_group(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("model:", "charllama", "data:", "shakespeare", "stage:", "magnitude", "rtn", "metrics:",
                 "perplexity", "hydra/launcher:", "local_parallel"):  # fmt: skip
        assert word in out


def test_state_cache_skips_finished_prefixes_and_stays_bounded(tiny_overrides, tmp_path, monkeypatch):
    from compress_order.run import pipeline

    cache_dir = tmp_path / "states"
    overrides = tiny_overrides + [f"state_cache.dir={cache_dir}", "stages=[magnitude,rtn,{name:magnitude,sparsity:0.8,label:more}]"]
    calls = {"n": 0}
    real = pipeline.apply_stage

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "apply_stage", counting)
    with pytest.raises(RuntimeError):
        run(compose_config(overrides), tmp_path / "a")
    cached = len(list(cache_dir.glob("*.pt")))
    assert cached >= 2  # the inner nodes finished before the crash
    calls["n"] = -1000
    df = run(compose_config(overrides), tmp_path / "b")
    assert df["order"].nunique() == 16
    # 15 applications in all (3 + 6 + 6); those of cached finished inner nodes are not repeated
    assert calls["n"] - (-1000) <= 15 - cached
    small = tiny_overrides + [f"state_cache.dir={tmp_path / 's2'}", "state_cache.max_gb=0.000001", "force=true"]
    run(compose_config(small), tmp_path / "c")
    assert len(list((tmp_path / "s2").glob("*.pt"))) == 1  # evicted down to the newest state


def test_validate_expands_an_experiments_own_sweep(capsys):
    assert main(["validate", "-m", "experiment=mini_lm_calibrated"]) == 0
    out = capsys.readouterr().out
    assert "8 configuration(s) valid" in out and "3 orders, 5 stage applications" in out  # + the joint order
    assert exit_code(["validate", "-m", "experiment=mini_lm", "bits=3,9"]) == 2
    assert "bits=9 is outside 2-8" in capsys.readouterr().err


def test_a_config_that_sets_multirun_gets_the_sweep_summary(tiny_overrides, tmp_path, capsys):
    # hydra.mode=MULTIRUN is what an experiment config sets to sweep without -m.
    rc = exit_code(["run", "hydra.mode=MULTIRUN", *_sweep_overrides(tiny_overrides), "bits=3,4"])
    out = capsys.readouterr().out
    assert rc == 0 and "sweep: 2 jobs, 2 ok, 0 failed" in out
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert set(df["job"]) == {0, 1} and sorted(df["bits"].unique()) == [3, 4]


def test_hydra_flags_are_parsed_by_hydra(tiny_overrides, capsys):
    assert exit_code(["run", "--cfg", "job", *tiny_overrides, "bits=5"]) == 0  # --cfg only prints: bits=5 not checked
    assert "bits: 5" in capsys.readouterr().out
    assert exit_code(["run", *tiny_overrides, "--cfg", "job", "sparsity=0.5"]) == 0  # overrides on both sides
    assert "sparsity: 0.5" in capsys.readouterr().out
    for bad, message in ((["--no-such-flag", "bits=4"], "unexpected argument(s) --no-such-flag"),
                         (["--info", "nonsense"], "argument --info/-i: invalid choice: 'nonsense'")):  # fmt: skip
        assert exit_code(["run", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "--hydra-help" in err[0]
