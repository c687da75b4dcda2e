"""A row claims what was done, no more (issue #41): each test reads the rows of a named run."""

from __future__ import annotations

from helpers import run

from compress_order.config.compose import compose_config


def _sim(df, metric: str):
    ok = df[(df["backend"] == "dense-simulated") & (df["status"] == "ok") & (df["metric"] == metric)]
    return ok.set_index("order")["value"]


def test_a_transform_alone_claims_no_coverage(tiny_overrides, tmp_path):
    """smoothquant rescales and compresses nothing: its node once reported coverage 1.0 at 16 bits, 0% sparse."""
    cfg = compose_config(tiny_overrides + ["format=nvfp4", "stages=[smoothquant,rtn]", "eval.backends=none"])
    df = run(cfg, tmp_path / "run")
    cov, bits = _sim(df, "coverage"), _sim(df, "avg_bits")
    assert bits["smoothquant"] == 16 and cov["smoothquant"] == 0 and cov["dense"] == 0
    assert cov["rtn"] == 1 and cov["smoothquant > rtn"] == 1
