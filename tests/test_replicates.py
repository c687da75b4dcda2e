"""Seed replicates: nodes under a calibrated stage are computed for every seed, seed-free nodes once."""

from __future__ import annotations

import json

import pandas as pd

from compress_order.cli.main import main
from compress_order.config.compose import compose_config
from compress_order.core.schema import STATS_FILE
from helpers import run
from compress_order.evaluation.metrics import METRICS

STAGES = ["stages=[magnitude,wanda]", "sparsity=0.5", "eval.backends=none"]  # dense, magnitude seed-free


def _values(df: pd.DataFrame) -> pd.Series:
    keep = df[(df["backend"] == "dense-simulated") & ~df["metric"].map(lambda m: METRICS[m].measured)]
    return keep.set_index(["seed", "order", "metric"])["value"].sort_index()


def test_replicates_share_seed_free_nodes_and_equal_single_seed_runs(tiny_overrides, tmp_path, capsys):
    assert main(["validate", *tiny_overrides, *STAGES, "replicates=3"]) == 0
    assert "plan: 1 job(s), 15 nodes, 11 distinct, 0 stored; to do: 12 stage applications, 11 evaluations" in capsys.readouterr().out
    df = run(compose_config(tiny_overrides + STAGES + ["replicates=3"]), tmp_path / "rep")
    stats = json.loads((tmp_path / "rep" / STATS_FILE).read_text())
    assert stats["evaluations"] == 2 + 3 * 3 and stats["from_store"] == 2 * 2  # dense, magnitude: once
    assert sorted(df["seed"].unique()) == [0, 1, 2] and df.groupby("seed")["order"].nunique().eq(5).all()
    wanda = df[(df["order"] == "wanda") & (df["metric"] == "perplexity")]
    assert wanda["node_key"].nunique() == 3 and wanda["value"].nunique() == 3  # one calibration draw a seed
    samples = pd.read_parquet(tmp_path / "rep" / "samples.parquet")
    assert not samples.duplicated(["node_key", "metric", "unit"]).any()  # a shared node's units written once
    singles = []
    for seed in range(3):
        over = [o for o in tiny_overrides if not o.startswith("store_dir")] + STAGES
        singles.append(run(compose_config(over + [f"seed={seed}", f"store_dir={tmp_path / f's{seed}'}"]),
                           tmp_path / f"single{seed}"))  # fmt: skip
    pd.testing.assert_series_equal(_values(df), _values(pd.concat(singles, ignore_index=True)))
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "means over 3 calibration seeds (0, 1, 2)" in summary and "perplexity sd" in summary


def test_explicit_seeds(tiny_overrides, tmp_path):
    df = run(compose_config(tiny_overrides + STAGES + ["seeds=[5,7]"]), tmp_path / "out")
    assert sorted(df["seed"].unique()) == [5, 7]
    assert json.loads((tmp_path / "out" / STATS_FILE).read_text())["evaluations"] == 2 + 2 * 3
