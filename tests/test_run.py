"""End to end on a tiny model: tidy files with the documented schema, one row per node and metric, resume."""

from __future__ import annotations

import json

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from compress_order.config.compose import compose_config
from compress_order.evaluation.metrics import METRICS
from compress_order.core.schema import COLUMNS
from helpers import run

NODE_METRICS = {"perplexity", "sparsity", "avg_bits", "coverage", "size_bytes", "latency_ms", "latency_ms_iqr",
                "decode_ms_per_token", "peak_mem_mb"}


def _run(overrides, out: Path) -> pd.DataFrame:
    return run(compose_config(overrides), out)


def test_run_writes_tidy_rows_for_every_node(tiny_overrides, tmp_path):
    df = _run(tiny_overrides + ["bits=3", "sparsity=0.7", "group_size=64"], tmp_path / "out")
    for name in ("results.parquet", "results.csv", "summary.md", "samples.parquet"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    disk = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(disk.columns) == COLUMNS and len(disk) == len(df)
    assert set(disk["order"]) == {"dense", "magnitude", "rtn", "magnitude > rtn", "rtn > magnitude"}
    sim = disk[disk["backend"] == "dense-simulated"]
    assert sim.groupby("order")["metric"].apply(set).map(lambda s: s == NODE_METRICS).all()
    assert not disk.duplicated(["order", "metric", "backend"]).any()
    assert all(disk["higher_is_better"] == disk["metric"].map(lambda m: METRICS[m].higher_is_better))
    v = sim.pivot(index="order", columns="metric", values="value")
    assert v.loc["dense", "sparsity"] == 0 and v.loc["dense", "avg_bits"] == 16
    for order in ("magnitude", "magnitude > rtn", "rtn > magnitude"):
        assert v.loc[order, "sparsity"] >= 0.7
    assert v.loc["magnitude > rtn", "avg_bits"] < v.loc["rtn", "avg_bits"] < v.loc["magnitude", "avg_bits"]
    real = disk[disk["backend"] != "dense-simulated"]
    # CPU kernels, labelled with their activation dtype; bf16's speed-up reference is the node cast to bf16
    assert set(real["backend"]) == {"int8_weight_only(fp32)", "int4_weight_only(bf16)", "dense(bf16)"}
    assert set(real[real["backend"] == "dense(bf16)"]["order"]) == {"rtn", "magnitude > rtn", "rtn > magnitude"}
    assert real[real["order"] == "dense"]["status"].eq("n/a").all()  # dense weights: no int kernel applies
    assert real[(real["order"] == "magnitude > rtn") & (real["metric"] == "latency_ms")]["value"].gt(0).all()
    assert set(real[real["status"] == "ok"]["metric"]) == {"latency_ms", "latency_ms_iqr", "decode_ms_per_token"}
    assert set(disk["depth"]) == {0, 1, 2} and disk["stages"].iloc[0] == "magnitude,rtn"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "◀ best" in summary and "non-overlapping windows of 64 tokens" in summary
    # one shape, one dtype: the dense-simulated latency is timed once and every node reports that figure
    assert json.loads((tmp_path / "out" / "run_stats.json").read_text())["latency_timings"] == 1
    assert sim[sim["metric"] == "latency_ms"]["value"].nunique() == 1
    assert "1 timing(s) for 5 evaluated node(s)" in summary
    assert "int4_weight_only(bf16) speed-up" in summary and "int8_weight_only(fp32) speed-up" in summary
    samples = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    nll = samples[samples["order"] == "dense"]["value"]
    assert abs(float(nll.mean()) - float(pd.Series(v.loc["dense", "perplexity"]).map(__import__("math").log)[0])) < 1e-9


def test_rerun_reloads_finished_nodes_and_force_recomputes(tiny_overrides, tmp_path):
    first = _run(tiny_overrides, tmp_path / "a")
    second = _run(tiny_overrides, tmp_path / "b")  # same store: nothing recomputed, same values and stamps
    cols = ["order", "metric", "backend", "value", "timestamp", "node_key"]
    pd.testing.assert_frame_equal(first[cols], second[cols])
    forced = _run(tiny_overrides + ["force=true"], tmp_path / "c")
    q = forced[forced["metric"] == "perplexity"].set_index("order")["value"]  # bit-identical values
    p = first[first["metric"] == "perplexity"].set_index("order")["value"]
    pd.testing.assert_series_equal(p, q)  # deterministic on CPU


def test_reversed_stage_list_shares_nodes(tiny_overrides, tmp_path):
    a = _run(tiny_overrides + ["stages=[magnitude,rtn]"], tmp_path / "a")
    b = _run(tiny_overrides + ["stages=[rtn,magnitude]"], tmp_path / "b")
    ka = a.set_index(["order", "metric", "backend"])["node_key"]
    kb = b.set_index(["order", "metric", "backend"])["node_key"]
    assert (ka.sort_index() == kb.sort_index()).all()


def test_cli_run_end_to_end(tiny_overrides, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "compress_order", "run", *tiny_overrides, "stages=[rtn,magnitude]", "bits=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rtn > magnitude" in out.stdout and "◀ best" in out.stdout
    assert (tmp_path / "run" / "results.parquet").is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
