"""The metric registry's definitions, scipy-bootstrap intervals, and order verdicts pooled over calibration seeds
on hand-made run folders (results.parquet + samples.parquet as the runner writes them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from compress_order.cli import main as cli
from compress_order.analysis import bootstrap, collect, pih, tables
from compress_order.analysis.report import write_report
from compress_order.evaluation.metrics import METRICS, Metric, primary_metrics, register, summary_metrics
from compress_order.run.summary import SUMMARY_METRICS

from compress_order.core.schema import COLUMNS
CALIBRATED = ("wanda", "gptq")
DATA_FREE = ("magnitude", "rtn")


def orders(stages: tuple[str, str]) -> tuple[str, str]:
    f1, f2 = stages
    return f"{f1} > {f2}", f"{f2} > {f1}"


def seed_frames(stages: tuple[str, str], seed: int, advantage: float, n_units: int = 400, noise: float = 0.01):
    """Rows and per-window NLL samples of one seed: f1-first has `advantage` less mean NLL than f2-first."""
    f1, f2 = stages
    first, second = orders(stages)
    shifts = {"dense": 0.0, f1: 0.1, f2: 0.4, first: 0.6 - advantage, second: 0.6}
    ctx = dict(model="m", dataset="d", stages=",".join(stages), bits=4, sparsity=0.5, group_size=128, seed=seed)
    rng = np.random.default_rng(100 + seed)
    base = np.random.default_rng(0).normal(2.0, 0.4, n_units)  # the same evaluation windows for every seed
    results, samples = [], []
    for order, shift in shifts.items():
        nll = base + shift + rng.normal(0, noise, n_units)
        key = f"{order}|{seed}"
        results.append({**{c: None for c in COLUMNS}, **ctx, "run_id": "r", "order": order,
                        "depth": 0 if order == "dense" else len(order.split(" > ")), "metric": "perplexity",
                        "value": float(np.exp(nll.mean())), "higher_is_better": False, "backend": "test",
                        "status": "ok", "error": "", "node_key": key, "timestamp": "t"})  # fmt: skip
        samples.append(pd.DataFrame({"order": order, "node_key": key, "metric": "nll", "unit": np.arange(n_units),
                                     "value": nll}))  # fmt: skip
    return pd.DataFrame(results, columns=COLUMNS), pd.concat(samples, ignore_index=True)


def write_seeds(root, stages, advantages: dict[int, float], one_folder: bool = False) -> None:
    """Run folders of a seed sweep (one per seed), or one run folder holding every seed (replicates)."""
    parts = {s: seed_frames(stages, s, a) for s, a in advantages.items()}
    groups = {"0": list(parts.values())} if one_folder else {str(s): [p] for s, p in parts.items()}
    for name, frames in groups.items():
        d = root / name
        d.mkdir(parents=True)
        pd.concat([r for r, _ in frames]).to_parquet(d / "results.parquet")
        pd.concat([s for _, s in frames]).to_parquet(d / "samples.parquet")
        (d / "summary.md").write_text("# done\n")


def a_row(root, n_boot: int = 400) -> pd.Series:
    df = collect.collect([root])
    diffs = bootstrap.order_differences(df, "perplexity", n_boot)
    assert len(diffs) == 1
    return diffs.iloc[0]


# --- the registry ------------------------------------------------------------------------------------------------


def test_registry_defines_units_reductions_and_roles():
    assert METRICS["perplexity"].from_mean(np.log(7.0)) == pytest.approx(7.0)
    assert METRICS["top1"].from_mean(0.25) == pytest.approx(25.0) and METRICS["nll"].from_mean(1.5) == 1.5
    assert (METRICS["perplexity"].unit_sample, METRICS["top1"].unit_sample) == ("nll", "correct")
    assert METRICS["top5"].unit_sample == "correct_top5" and METRICS["latency_ms"].unit_sample is None
    assert primary_metrics() == ["perplexity", "top1"]
    assert SUMMARY_METRICS == summary_metrics()
    assert SUMMARY_METRICS[:4] == ["perplexity", "top1", "top5", "nll"]


def test_register_is_idempotent_and_refuses_redefinition():
    m = Metric("test_task/acc", True, "a test score", unit_sample="test_task/acc")
    try:
        assert register(m) is m and register(Metric("test_task/acc", True, "a test score",
                                                    unit_sample="test_task/acc")) is m  # fmt: skip
        with pytest.raises(ValueError, match="already registered"):
            register(Metric("test_task/acc", False, "a test score", unit_sample="test_task/acc"))
        assert METRICS["test_task/acc"] is m
    finally:
        METRICS.pop("test_task/acc")
    with pytest.raises(ValueError, match="reduction"):
        Metric("x", True, "x", reduction="log")


def test_lmeval_scores_get_intervals_from_their_documents():
    from compress_order.evaluation.lmeval import results_to_metrics

    correct = np.random.default_rng(0).random(200) < 0.6
    out = {"results": {"toy": {"acc,none": float(correct.mean()), "acc_stderr,none": 0.03}},
           "higher_is_better": {"toy": {"acc": True}},
           "samples": {"toy": [{"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": float(c)}
                               for i, c in enumerate(correct)]}}  # fmt: skip
    try:
        metrics, samples = results_to_metrics(out)
        m = METRICS["toy/acc"]
        assert m.unit_sample == "toy/acc" and METRICS["toy/acc_stderr"].unit_sample is None
        est, lo, hi = bootstrap.bootstrap_ci(samples[m.unit_sample], "toy/acc", n_boot=300)
        assert est == pytest.approx(metrics["toy/acc"]) and lo < est < hi and hi - lo < 0.2
    finally:
        METRICS.pop("toy/acc", None)
        METRICS.pop("toy/acc_stderr", None)


# --- scipy's bootstrap ---------------------------------------------------------------------------------------------


def test_constant_samples_fall_back_from_bca():
    stat = bootstrap._difference(METRICS["perplexity"])
    rng = np.random.default_rng(0)
    same = np.full(50, 2.0)
    assert bootstrap.window_interval((same, same), stat, 200, rng)[:2] == (0.0, 0.0)  # identical orders: no effect
    x = rng.normal(2, 0.3, 300)
    lo, hi, method = bootstrap.window_interval((x + 0.1, x), stat, 300, rng)
    assert method == "BCa" and lo < stat(x + 0.1, x) < hi and lo > 0


def test_many_units_use_bounded_batches(monkeypatch):
    calls = []
    real = bootstrap.stats.bootstrap

    def spy(*args, **kw):
        calls.append((kw["batch"], kw["method"]))
        return real(*args, **kw)

    monkeypatch.setattr(bootstrap.stats, "bootstrap", spy)
    monkeypatch.setattr(bootstrap, "CHUNK", 100_000)
    x = np.random.default_rng(0).normal(2, 0.3, 20_000)
    est, lo, hi = bootstrap.paired_bootstrap(x + 0.01, x, "nll", n_boot=200)
    assert calls == [(5, "percentile")]  # 5 resamples × 20k units at a time; BCa's n² jackknife skipped
    assert est == pytest.approx(0.01) and lo < est < hi


# --- verdicts across seeds -----------------------------------------------------------------------------------------


def test_seeds_that_disagree_in_sign_are_not_significant(tmp_path):
    write_seeds(tmp_path, CALIBRATED, {0: 0.05, 1: -0.04, 2: 0.03})
    df = collect.collect([tmp_path])
    for s in (0, 1, 2):  # every seed alone looks decisive over its windows
        alone = bootstrap.order_differences(df[df["seed"] == s], "perplexity", 300).iloc[0]
        assert alone["significant"] and alone["noise"] == bootstrap.WINDOWS_ONLY
    row = a_row(tmp_path)
    assert row["n_seeds"] == 3 and row["noise"] == bootstrap.SEEDS_AND_WINDOWS
    assert not row["significant"] and row["low"] < 0 < row["high"]
    assert row["seed_sd"] > 0 and row["low"] <= row["diff"] <= row["high"]


def test_seeds_that_agree_by_a_wide_margin_are_significant(tmp_path):
    write_seeds(tmp_path, CALIBRATED, {0: 0.30, 1: 0.32, 2: 0.29})
    row = a_row(tmp_path)
    assert row["significant"] and row["noise"] == bootstrap.SEEDS_AND_WINDOWS and row["low"] > 0
    # A pooled over seeds: perplexity of f2-first minus f1-first, averaged over the three seeds
    settings = bootstrap.attach_a_interval(pih.analyze(collect.collect([tmp_path]), "perplexity")[1],
                                           bootstrap.order_differences(collect.collect([tmp_path]), "perplexity", 300))
    s = settings.iloc[0]
    assert s["n_seeds"] == 3 and s["A_significant"] and s["A_low"] > 0 and s["A"] == pytest.approx(row["diff"])
    assert pih.agreement(settings, significant_only=True) == (1.0, 1, 1)


def test_seeds_in_one_folder_or_many_give_the_same_verdict(tmp_path):
    advantages = {0: 0.05, 1: -0.04, 2: 0.03}
    write_seeds(tmp_path / "sweep", CALIBRATED, advantages)
    write_seeds(tmp_path / "replicates", CALIBRATED, advantages, one_folder=True)
    sweep, replicates = a_row(tmp_path / "sweep"), a_row(tmp_path / "replicates")
    assert replicates["n_seeds"] == 3 and replicates["diff"] == pytest.approx(sweep["diff"])
    assert replicates["seed_sd"] == pytest.approx(sweep["seed_sd"]) and not replicates["significant"]


def test_single_seed_of_a_calibrated_stage_is_labelled_windows_only(tmp_path, capsys):
    write_seeds(tmp_path / "run", CALIBRATED, {0: 0.3})
    row = a_row(tmp_path / "run")
    assert row["significant"] and row["noise"] == bootstrap.WINDOWS_ONLY and row["n_seeds"] == 1
    assert cli.main(["analyze", str(tmp_path / "run"), "--n-boot", "200", "--no-plots"]) == 0
    report = (tmp_path / "run" / "analysis" / "analysis.md").read_text()
    significance = report.split("## Significance")[1]
    assert "windows only" in significance and "calibration noise" in significance
    assert "| yes " not in significance and "gptq, wanda" in significance
    assert pd.read_csv(tmp_path / "run" / "analysis" / "settings.csv")["A_noise"].tolist() == ["windows only"]


def test_single_seed_of_data_free_stages_needs_no_label(tmp_path):
    write_seeds(tmp_path / "run", DATA_FREE, {0: 0.3})
    row = a_row(tmp_path / "run")
    assert row["significant"] and row["noise"] == bootstrap.SEED_FREE
    text = write_report(collect.collect([tmp_path / "run"]), tmp_path / "out", n_boot=200, plots=False)
    significance = text.split("## Significance")[1]
    assert "| yes" in significance and "windows only" not in significance


def test_seed_dependence_comes_from_stage_classes():
    assert tables.seed_dependent("wanda > rtn") and tables.seed_dependent("sparsegpt_gptq")
    assert not tables.seed_dependent("magnitude > rtn") and not tables.seed_dependent("dense")
    assert tables.seed_dependent("prune1 > rtn")  # a custom label: cannot be traced, so treated as calibrated


def test_report_pools_seeds_and_shows_their_spread(tmp_path):
    write_seeds(tmp_path, CALIBRATED, {0: 0.05, 1: -0.04, 2: 0.03})
    text = write_report(collect.collect([tmp_path]), tmp_path / "out", n_boot=200, plots=False)
    seeds = text.split("## Seeds")[1]
    assert "mean ± sd" in seeds and "wanda > gptq" in seeds and " ± " in seeds
    assert "Each seed alone" in seeds
    assert "seeds+windows" in text.split("## Significance")[1]
    settings = pd.read_csv(tmp_path / "out" / "settings.csv")
    assert len(settings) == 1 and settings.loc[0, "n_seeds"] == 3 and not settings.loc[0, "A_significant"]


def test_vision_run_gives_intervals_for_top1_top5_and_nll(tmp_path):
    """Every vision accuracy metric is the registered reduction of a per-image sample the task stores."""
    import timm
    import torch
    from safetensors.torch import save_file

    from compress_order.config.compose import compose_config
    from helpers import run

    channels = [32, 32, 32, 32]
    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10, layers=[1, 1, 1, 1], channels=channels)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "tiny.safetensors")
    cfg = compose_config([
        "model=mnist_resnet", f"model.checkpoint={tmp_path / 'tiny.safetensors'}", "model.name=tiny-resnet",
        "model.kwargs.layers=[1,1,1,1]", f"model.kwargs.channels={channels}", "data=mnist", "data.test_size=40",
        "eval.batch_size=20", "eval.latency.batch=2", "eval.latency.repeats=1", "eval.latency.warmup=0",
        "eval.backends=none", f"store_dir={tmp_path / 'store'}", "threads=1", "bits=4", "sparsity=0.5",
        "group_size=32", "stages=[magnitude,rtn]",
    ])  # fmt: skip
    run(cfg, tmp_path / "out")
    df = collect.collect([tmp_path / "out"])
    for metric in ("top1", "top5", "nll"):
        m = METRICS[metric]
        nodes = tables.node_values(df, metric)
        for _, row in nodes.iterrows():  # the stored value is reproduced from its per-image samples
            assert bootstrap.node_units(row, m) is not None
        diffs = bootstrap.order_differences(df, metric, n_boot=200)
        assert len(diffs) == 1 and diffs.iloc[0]["noise"] == bootstrap.SEED_FREE
        assert diffs.iloc[0]["low"] <= diffs.iloc[0]["diff"] <= diffs.iloc[0]["high"]


def test_a_single_unit_gives_no_interval(tmp_path):
    results, samples = seed_frames(CALIBRATED, 0, 0.3, n_units=1)
    (tmp_path / "run").mkdir()
    results.to_parquet(tmp_path / "run" / "results.parquet")
    samples.to_parquet(tmp_path / "run" / "samples.parquet")
    df = collect.collect([tmp_path / "run"])
    assert bootstrap.order_differences(df, "perplexity", 100).empty
    assert bootstrap.node_intervals(df, "perplexity", 100)["low"].isna().all()
