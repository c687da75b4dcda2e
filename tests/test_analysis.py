"""Analysis on hand-made rows and fake run folders: tables, the paper's quantities, bootstrap CIs, plots,
collect, the CLI, every experiment config, and the mixed-precision stage."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers import write_fake_run

from compress_order.cli import main as cli
from compress_order.analysis import bootstrap, collect, pih, plots, tables
from compress_order.analysis.report import write_report
from compress_order.config.compose import compose_config, expand_overrides
from compress_order.core.errors import UserError
from compress_order.core.paths import CONF_DIR, group_options
from compress_order.evaluation.metrics import METRICS
from compress_order.core.schema import COLUMNS

PAIR = ("magnitude", "rtn")


# --- builders ------------------------------------------------------------------------------------------------------


def node_rows(ctx: dict, order: str, metric: str, value: float) -> dict:
    """One tidy row as the runner writes it (the results-file contract, not the writer's internals)."""
    depth = 0 if order == "dense" else len(order.split(" > "))
    return {**{c: None for c in COLUMNS}, "run_id": "r", **ctx, "order": order, "depth": depth, "metric": metric,
            "value": float(value), "higher_is_better": METRICS[metric].higher_is_better, "backend": "test",
            "status": "ok", "error": "", "node_key": f"{order}|{sorted(ctx.items())}", "timestamp": "t"}  # fmt: skip


def rows(values: dict[str, float], stages=PAIR, metric: str = "perplexity", **setting) -> pd.DataFrame:
    """Tidy rows of one setting: order → metric value (orders as the runner labels them)."""
    ctx = dict(model="m", dataset="d", stages=",".join(stages), bits=3, sparsity=0.5, group_size=128, seed=0)
    ctx.update(setting)
    return pd.DataFrame([node_rows(ctx, order, metric, v) for order, v in values.items()], columns=COLUMNS)


def pair_values(dense: float, f1: float, f2: float, f1_first: float, f2_first: float) -> dict[str, float]:
    return {"dense": dense, "magnitude": f1, "rtn": f2, "magnitude > rtn": f1_first, "rtn > magnitude": f2_first}


def write_run(run_dir, shifts: dict[str, float], finished: bool = True, n_units: int = 300, noise: float = 0.02,
              **setting) -> None:  # fmt: skip
    """A run folder as the runner writes it: perplexity rows from per-window NLLs (base + shift per order)."""
    ctx = dict(model="m", dataset="d", stages="magnitude,rtn", bits=3, sparsity=0.5, group_size=128, seed=0)
    ctx.update(setting)
    rng = np.random.default_rng(ctx["seed"])
    base = rng.normal(2.0, 0.4, n_units)
    results, samples = [], []
    for order, shift in shifts.items():
        nll = base + shift + rng.normal(0, noise, n_units)
        results.append(node_rows(ctx, order, "perplexity", np.exp(nll.mean())))
        samples.append(pd.DataFrame({"order": order, "node_key": results[-1]["node_key"], "metric": "nll",
                                     "unit": np.arange(n_units), "value": nll}))  # fmt: skip
    write_fake_run(run_dir, results, samples, finished)


SHIFTS = {"dense": 0.0, "magnitude": 0.1, "rtn": 0.4, "magnitude > rtn": 0.5, "rtn > magnitude": 0.7}


@pytest.fixture
def sweep(tmp_path):
    """A multirun folder: two finished jobs, a partial one, two failures (old and new style), an aggregate."""
    root = tmp_path / "sweep"
    write_run(root / "0", SHIFTS, bits=3)
    write_run(root / "1", SHIFTS, bits=4)
    write_run(root / "2", dict(list(SHIFTS.items())[:3]), finished=False, bits=2)  # killed after 3 nodes
    (root / "3" / ".hydra").mkdir(parents=True)  # failed before any node, failed.json only
    (root / "3" / ".hydra" / "config.yaml").write_text(
        "model: {name: m}\ndata: {name: d}\nstages: [magnitude, {name: rtn, label: q}]\n"
        "bits: 8\nsparsity: 0.9\ngroup_size: 128\nseed: 0\n"
    )
    (root / "3" / "failed.json").write_text(json.dumps({"job": 3, "overrides": ["bits=8"], "error": "boom"}))
    write_run(root / "4", dict(list(SHIFTS.items())[:2]), finished=False, bits=5)  # failed mid-run, new style
    failed_row = pd.DataFrame([{**{c: None for c in COLUMNS}, "status": "failed", "error": "oom", "metric": ""}])
    pd.concat([pd.read_parquet(root / "4" / "results.parquet"), failed_row]).to_parquet(root / "4" / "results.parquet")
    (root / "4" / "failed.json").write_text(json.dumps({"job": 4, "overrides": ["bits=5"], "error": "oom"}))
    # the end-of-sweep aggregate of the jobs: must not be read twice
    pd.read_parquet(root / "0" / "results.parquet").assign(job=0).to_parquet(root / "results.parquet")
    return root


# --- the paper's quantities on hand-made rows ----------------------------------------------------------------


def test_intensity_gap_and_advantage_lower_is_better():
    stages, settings = pih.analyze(rows(pair_values(10, 12, 15, 18, 20)), "perplexity")
    s = settings.iloc[0]
    assert (s.I_f1, s.I_f2, s.G, s.A) == (2, 5, 3, 2)  # A > 0: magnitude first has the lower perplexity
    assert s.predicted == s.observed == "magnitude > rtn" and s.agree
    assert stages.set_index("stage")["intensity"].to_dict() == {"magnitude": 2, "rtn": 5}


def test_advantage_sign_higher_is_better():
    df = rows(pair_values(70, 68, 60, 55, 58), metric="top1")
    s = pih.analyze(df, "top1")[1].iloc[0]
    assert (s.I_f1, s.I_f2, s.G, s.A) == (2, 10, 8, -3)
    assert s.predicted == "magnitude > rtn" and s.observed == "rtn > magnitude" and not s.agree


def test_agreement_rate_and_rank_correlation():
    gaps, advantages = [1, 2, 3, 4], [0.5, 1.0, -0.2, 3.0]
    df = pd.concat(
        rows(pair_values(10, 11, 11 + g, 20 - a / 2, 20 + a / 2), sparsity=s)
        for g, a, s in zip(gaps, advantages, [0.1, 0.2, 0.3, 0.4])
    )  # fmt: skip
    settings = pih.analyze(df, "perplexity")[1]
    assert settings["G"].tolist() == gaps and np.allclose(settings["A"], advantages)
    assert pih.agreement(settings) == (0.75, 3, 4)
    rho, p, n = pih.rank_correlation(settings)
    assert n == 4 and rho == pytest.approx(0.4)  # ranks of A: 2, 3, 1, 4


def test_ties_make_no_prediction_and_no_winner():
    settings = pih.analyze(rows(pair_values(10, 12, 12, 13, 14)), "perplexity")[1]
    assert settings["predicted"].isna().all() and pih.agreement(settings)[2] == 0
    df = rows(pair_values(10, 12, 15, 18, 18))
    assert pih.analyze(df, "perplexity")[1]["observed"].isna().all()
    assert tables.order_table(df, "perplexity")[0]["best"].tolist() == ["tie"]


def test_cer_interpolates_the_quantization_curve():
    assert pih.equivalent_bits([2, 3, 4, 8], [100, 20, 12, 10.5], 15) == pytest.approx(3.625)
    assert pih.equivalent_bits([2, 3, 4, 8], [100, 20, 12, 10.5], 20) == pytest.approx(3)
    assert math.isnan(pih.equivalent_bits([2, 3, 4, 8], [100, 20, 12, 10.5], 9))  # better than 8 bits: off the curve
    curve = {2: 100, 3: 20, 4: 12, 8: 10.5}
    df = pd.concat(rows(pair_values(10, 15, q, 30, 31), bits=b) for b, q in curve.items())
    stages, settings = pih.analyze(df, "perplexity")
    cer = stages.pivot_table(index="bits", columns="stage", values="cer_bits")
    assert np.allclose(cer["magnitude"], 3.625) and np.allclose(cer["rtn"], [2, 3, 4, 8])
    assert settings.set_index("bits").loc[3, "dCER"] == pytest.approx(0.625)


def test_split_budget_prediction_sorts_by_intensity():
    labels = ("prune1", "rtn", "prune2")
    values = {"dense": 10, "prune1": 11, "rtn": 14, "prune2": 12}
    orders = ["prune1 > rtn > prune2", "prune1 > prune2 > rtn", "rtn > prune1 > prune2", "rtn > prune2 > prune1",
              "prune2 > prune1 > rtn", "prune2 > rtn > prune1"]  # fmt: skip
    values.update({o: 20 + i for i, o in enumerate(orders)})
    values["prune1 > prune2 > rtn"] = 15  # the PIH order is the best one
    s = pih.analyze(rows(values, stages=labels), "perplexity")[1].iloc[0]
    assert s.n_stages == 3 and s.predicted == s.observed == "prune1 > prune2 > rtn" and s.agree
    assert math.isnan(s.A)  # A and G are pairwise quantities


# --- bootstrap -----------------------------------------------------------------------------------------------


def test_paired_bootstrap_covers_a_known_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 0.5, 2000)
    est, lo, hi = bootstrap.paired_bootstrap(a + 0.3 + rng.normal(0, 0.05, a.size), a, "nll", n_boot=500)
    assert lo < 0.3 < hi and lo > 0 and est == pytest.approx(0.3, abs=0.01)
    est, lo, hi = bootstrap.paired_bootstrap(a + rng.normal(0, 0.05, a.size), a, "perplexity", n_boot=500)
    assert lo < 0 < hi  # no real difference: not significant
    correct = (rng.random(1000) < 0.7).astype(float)
    est, lo, hi = bootstrap.paired_bootstrap(correct, np.zeros(1000), "top1", n_boot=300)
    assert lo < est < hi and est == pytest.approx(100 * correct.mean())


def test_order_differences_flag_significance(tmp_path):
    write_run(tmp_path / "big", SHIFTS, bits=3)
    write_run(tmp_path / "tie", {**SHIFTS, "rtn > magnitude": 0.5}, bits=4, noise=0.01)
    df = collect.collect([tmp_path])
    diffs = bootstrap.order_differences(df, "perplexity", n_boot=300).set_index("bits")
    assert diffs.loc[3, "significant"] and diffs.loc[3, "low"] > 0  # magnitude first: clearly lower perplexity
    assert not diffs.loc[4, "significant"] and diffs.loc[4, "low"] < 0 < diffs.loc[4, "high"]
    settings = bootstrap.attach_a_interval(pih.analyze(df, "perplexity")[1], diffs.reset_index()).set_index("bits")
    assert settings.loc[3, "A_low"] <= settings.loc[3, "A"] <= settings.loc[3, "A_high"]
    assert settings.loc[3, "A_significant"] and not settings.loc[4, "A_significant"]
    # 3-stage settings (no f1/f2: A is pairwise) get no interval instead of breaking the merge
    three = settings.reset_index().assign(f1=math.nan, f2=math.nan, stages="a,b,c")
    assert bootstrap.attach_a_interval(three, diffs.reset_index())["A_low"].isna().all()


def test_seeds_summarised_as_mean_and_sd():
    df = pd.concat(rows(pair_values(10, 12, 15, 18 + s, 20), seed=s) for s in (0, 1, 2))
    summary = bootstrap.seed_summary(pih.analyze(df, "perplexity", by_seed=True)[1], ["A"])
    assert summary.loc[0, "n_seeds"] == 3 and summary.loc[0, "A_mean"] == pytest.approx(1.0)
    assert bootstrap.mean_sd(summary.loc[0, "A_mean"], summary.loc[0, "A_std"]) == "1 ± 1"
    pooled = pih.analyze(df, "perplexity")[1]  # one setting: the mean over seeds of every node
    assert len(pooled) == 1 and pooled.loc[0, "n_seeds"] == 3 and pooled.loc[0, "A"] == pytest.approx(1.0)


# --- tables ------------------------------------------------------------------------------------------------------


def test_order_table_pivots_orders_and_difference():
    df = pd.concat([rows(pair_values(10, 12, 15, 18, 20), bits=3), rows(pair_values(10, 11, 12, 14, 13), bits=4)])
    table, caption = tables.order_table(df, "perplexity", dense=True, singles=True)
    assert list(table.columns) == ["model", "dataset", "stages", "bits", "sparsity", "group_size", "dense",
                                   "magnitude", "rtn", "magnitude > rtn", "rtn > magnitude", "best", "A"]  # fmt: skip
    assert table["A"].tolist() == [2, -1] and table["best"].tolist() == ["magnitude > rtn", "rtn > magnitude"]
    assert "↓ better" in caption
    only4 = tables.order_table(tables.apply_where(df, ["bits=4"]), "perplexity")[0]
    assert only4["bits"].tolist() == [4] and "dense" not in only4.columns
    assert len(tables.apply_where(df, ["bits=3,4", "stages=magnitude,rtn"])) == len(df)
    with pytest.raises(UserError, match="unknown column"):
        tables.apply_where(df, ["bitz=4"])


def test_order_table_names_orders_by_kind_across_stage_lists():
    df = pd.concat([rows(pair_values(10, 12, 15, 18, 20)),
                    rows({"dense": 10, "rtn": 15, "magnitude": 12, "rtn > magnitude": 19, "magnitude > rtn": 17},
                         stages=("rtn", "magnitude"))])  # fmt: skip
    table = tables.order_table(df, "perplexity")[0]
    assert {"prune > quantize", "quantize > prune"} <= set(table.columns)
    assert table["best"].tolist() == ["prune > quantize", "prune > quantize"]


@pytest.mark.parametrize("fmt, marker", [("markdown", "| magnitude > rtn"), ("csv", "magnitude > rtn,"),
                                         ("latex", "\\begin{tabular}")])  # fmt: skip
def test_table_formats(fmt, marker):
    table, caption = tables.order_table(rows(pair_values(10, 12, 15, 18, 20)), "perplexity")
    text = tables.render(table, fmt, caption)
    assert marker in text
    if fmt == "csv":
        assert pd.read_csv(pd.io.common.StringIO(text))["A"].tolist() == [2]


def test_primary_metric_prefers_perplexity_then_top1():
    assert tables.primary_metric(pd.concat([rows({"dense": 1}, metric="nll"), rows({"dense": 1})])) == "perplexity"
    vision = pd.concat([rows({"dense": 1}, metric="nll"), rows({"dense": 1}, metric="top1")])
    assert tables.primary_metric(vision) == "top1"


# --- collect, report, plots, CLI -----------------------------------------------------------------------------------


def test_collect_reads_a_multirun_with_failures(sweep):
    df = collect.collect([sweep])
    runs = df.groupby("path").agg(partial=("partial", "first"), failed=("status", lambda s: (s == "failed").sum()))
    runs.index = [p.rsplit("/", 1)[-1] for p in runs.index]
    assert runs["partial"].to_dict() == {"0": False, "1": False, "2": True, "3": True, "4": True}
    assert runs["failed"].to_dict() == {"0": 0, "1": 0, "2": 0, "3": 1, "4": 1}  # one failure row each
    fail3 = df[(df["status"] == "failed") & df["path"].str.endswith("3")].iloc[0]
    assert (fail3["error"], fail3["bits"], fail3["stages"]) == ("boom", 8, "magnitude,q")
    assert len(df[df["path"].str.endswith("0")]) == 5  # the sweep's aggregate file was not read again
    again = collect.collect([sweep / "0" / "results.parquet"])
    assert len(again) == 5 and again["path"].iloc[0] == str(sweep / "0")
    with pytest.raises(UserError, match="does not exist"):
        collect.collect([sweep / "nope"])


def test_report_writes_tables_and_figures(sweep, tmp_path):
    out = tmp_path / "report"
    text = write_report(collect.collect([sweep]), out, n_boot=200)
    assert "Progressive Intensity" in text and "PIH agreement" in text
    for name in ("table.md", "table.csv", "table.tex", "settings.csv", "stages.csv", "differences.csv",
                 "analysis.md", "a_vs_g.png", "a_vs_g.pdf", "order_bars.png", "order_bars.pdf",
                 "a_heatmap.png", "a_heatmap.pdf"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_plots_skip_when_there_is_nothing_to_draw(tmp_path):
    empty = pd.DataFrame(columns=["A", "G", "model", "stages"])
    assert plots.a_vs_g(empty, tmp_path, "perplexity") == [] and plots.a_heatmap(empty, tmp_path) == []


def test_cli_table_analyze_collect(sweep, tmp_path, capsys):
    assert cli.main(["table", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "magnitude > rtn" in out and re.search(r"\|\s+A\s+\|", out)
    csv = ["--format", "csv", "--where", "bits=3", "--out", str(tmp_path / "t.csv")]
    assert cli.main(["table", str(sweep), *csv]) == 0
    assert pd.read_csv(tmp_path / "t.csv")["bits"].tolist() == [3]
    assert cli.main(["collect", str(sweep), "--out", str(tmp_path / "all.parquet")]) == 0
    assert "2 failed, 3 partial" in capsys.readouterr().out
    assert cli.main(["table", str(tmp_path / "all.parquet"), "--metric", "perplexity"]) == 0
    assert cli.main(["analyze", str(sweep), "--out-dir", str(tmp_path / "a"), "--n-boot", "50", "--no-plots"]) == 0
    for bad in (["table", str(tmp_path / "missing")], ["table", str(sweep), "--format", "html"],
                ["table", str(sweep), "--metric", "top5"], ["table", str(sweep), "--where", "nope"]):  # fmt: skip
        assert cli.main(bad) == 2
        assert capsys.readouterr().err.startswith("compress-order: error:")


@pytest.mark.parametrize("args,message", [
    (["analyze", "{sweep}", "--n-boot", "-5"], "--n-boot: -5 is negative"),  # ran as no intervals
    (["frontier", "{sweep}", "--n-boot", "-1"], "--n-boot: -1 is negative"),
    (["best", "{sweep}", "--max-bits", "-1"], "--max-bits: -1 is not a budget; give a number > 0"),
    (["best", "{sweep}", "--max-latency-ms", "0"], "--max-latency-ms: 0 is not a budget"),
    (["best", "{sweep}", "--max-size", "0GB"], "--max-size 0GB is not a budget; give a size > 0"),
    # outputs that cannot be written: one line before any work (was a traceback after it)
    (["table", "{sweep}", "--out", "/proc/t.md"], "--out /proc/t.md: its folder '/proc' is not writable"),
    (["collect", "{sweep}", "--out", "/proc/all.parquet"], "--out /proc/all.parquet: its folder '/proc' is not writable"),
    (["collect", "{sweep}", "--out", "{tmp}"], "use a .parquet or .csv file name"),
    (["analyze", "{sweep}", "--out-dir", "/proc/report"], "--out-dir '/proc/report' is not writable"),
    (["frontier", "{sweep}", "--out", "/proc/report"], "--out '/proc/report' is not writable"),
])  # fmt: skip
def test_analysis_options_out_of_range_exit_2_with_one_line(args, message, sweep, tmp_path, capsys):
    argv = [a.format(sweep=sweep, tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# --- experiment configs ------------------------------------------------------------------------------------------

def sweep_points(name: str) -> list[list[str]]:
    """The grid of an experiment's hydra.sweeper.params, as override lists."""
    from omegaconf import OmegaConf

    params = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params
    return expand_overrides([f"{k}={v}" for k, v in params.items()])


@pytest.mark.parametrize("name", group_options("experiment"))
def test_experiment_config_composes(name):
    from compress_order.config.stages import build_stage, stage_configs
    from compress_order.config.validate import check_config

    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = compose_config([f"experiment={name}"])
    check_config(cfg)
    points = sweep_points(name)
    assert len(points) >= 4  # a grid, not a single run
    for point in points if name.startswith("mini_") else points[:1]:
        cfg = compose_config([f"experiment={name}", *point])
        for sc in stage_configs(cfg):
            build_stage(sc)


def test_split_budget_experiment_has_six_orders():
    from compress_order.config.stages import stage_configs
    from compress_order.run.trie import build_trie, full_orders

    cfg = compose_config(["experiment=mini_split_budget", "sparsity=0.7"])
    scs = stage_configs(cfg)
    assert [(sc.label, sc.get("sparsity")) for sc in scs] == [("prune1", 0.3), ("rtn", None), ("prune2", 0.7)]
    assert len(full_orders(build_trie([sc.label for sc in scs]))) == 6


def test_mixed_precision_experiment_budget_follows_bits():
    from compress_order.config.stages import build_stage, stage_configs

    cfg = compose_config(["experiment=mini_mixed_precision", "bits=4"])
    stage = build_stage(stage_configs(cfg)[1])
    assert stage.label == "rtn_mixed" and stage.budget == 4.0 and stage.kind == "quantize"


# --- mixed-precision stage ---------------------------------------------------------------------------------------


def mlp_targets():
    from compress_order.modeling.targets import find_targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 128))
    with torch.no_grad():
        model[1].weight[:, :4] *= 20  # outlier columns: this layer loses most to coarse grids
    return find_targets(model)


def test_mixed_bits_map_and_default():
    from compress_order.stages.mixed import MixedRTN

    targets = mlp_targets()
    stage = MixedRTN(bits=3, bits_map={"^1$": 8, "2": 4}, name="rtn_mixed")
    stage.validate(targets)
    assert stage.plan == {"0": 3, "1": 8, "2": 4}
    for t in targets.values():
        stage.compress(t)
        t.check()  # every weight on its own grid
        assert t.constraint.grid.bits == stage.plan[t.name]


def test_mixed_budget_allocates_by_sensitivity_within_budget():
    from compress_order.evaluation.measure import layer_bits
    from compress_order.stages.magnitude import Magnitude
    from compress_order.stages.mixed import MixedRTN

    targets = mlp_targets()
    stage = MixedRTN(bits=3, budget=3.0, choices=[2, 3, 4, 8], name="rtn_mixed")
    stage.validate(targets)
    sizes = {n: t.weight.numel() for n, t in targets.items()}
    avg = sum(stage.plan[n] * sizes[n] for n in targets) / sum(sizes.values())
    assert avg <= 3.0 and stage.plan["1"] == max(stage.plan.values()) and len(set(stage.plan.values())) > 1
    prune = Magnitude(sparsity=0.5, name="magnitude")
    for t in targets.values():  # pruned, then quantized at the planned widths: zeros stay zero
        prune.compress(t)
        stage.compress(t)
        t.check()
        assert t.constraint.grid.bits == stage.plan[t.name] and (t.weight == 0).float().mean() >= 0.5
        assert layer_bits(t)[0] > 0
    with pytest.raises(UserError, match="budget"):
        MixedRTN(bits=3, budget=9, name="rtn_mixed")
    with pytest.raises(UserError, match="outside 2-8"):
        MixedRTN(bits=3, bits_map={"x": 1}, name="rtn_mixed")


# --- unreadable result files -------------------------------------------------------------------------------------


def spoil(path, how: str) -> None:
    """Random bytes of the same size, or the first half of the file (a job killed while writing it)."""
    data = path.read_bytes()
    path.write_bytes(np.random.default_rng(1).bytes(len(data)) if how == "random" else data[: len(data) // 2])


def test_unreadable_files_are_skipped_and_reported(tmp_path, capsys):
    root = tmp_path / "sweep"
    for job, bits in enumerate((3, 4, 5)):
        write_run(root / str(job), SHIFTS, bits=bits)
    spoil(root / "1" / "results.parquet", "random")
    spoil(root / "2" / "results.parquet", "truncated")
    spoil(root / "0" / "samples.parquet", "truncated")
    write_run(root / "3", SHIFTS, bits=6)
    assert cli.main(["table", str(root)]) == 0
    out, err = capsys.readouterr()
    warned = [line for line in err.splitlines() if line.startswith("compress-order: warning: skipping unreadable")]
    assert len(warned) == 2 and str(root / "1" / "results.parquet") in err and "Traceback" not in err
    assert re.search(r"\|\s+3\s+\|", out) and re.search(r"\|\s+6\s+\|", out)
    assert not re.search(r"\|\s+4\s+\|", out)  # the spoilt runs contribute no rows
    report = tmp_path / "report"
    assert cli.main(["analyze", str(root), "--out-dir", str(report), "--n-boot", "50", "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert "3 unreadable file(s) skipped" in out and err.count("compress-order: warning") == 3
    listed = (report / "analysis.md").read_text().split("## Unreadable files")[1]
    for job in ("0/samples", "1/results", "2/results"):
        assert f"{root}/{job}.parquet" in listed
    diffs = pd.read_csv(report / "differences.csv")
    assert diffs["bits"].tolist() == [6]  # bits=3 lost its samples: no interval, but still its values


def test_nothing_readable_is_one_line_error(tmp_path, capsys):
    write_run(tmp_path / "run", SHIFTS)
    spoil(tmp_path / "run" / "results.parquet", "truncated")
    for cmd in ("table", "analyze", "collect"):
        assert cli.main([cmd, str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("compress-order: error: no readable results") and "Traceback" not in "".join(err)
    assert cli.main(["table", str(tmp_path / "run" / "results.parquet")]) == 2
