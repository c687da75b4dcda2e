"""Prediction from singles: `predict_only=true` runs the dense and single-stage nodes only and writes the order the
Progressive Intensity Hypothesis predicts; a later full run reuses them; `analyze` says how often it was right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from helpers import exit_code, write_fake_run

from compress_order.analysis import collect, pih
from compress_order.analysis.report import write_report
from compress_order.config.compose import compose_config
from compress_order.evaluation.metrics import METRICS
from compress_order.core.schema import COLUMNS
from compress_order.core.schema import STATS_FILE
from helpers import run

THREE = "stages=[magnitude,rtn,{name:magnitude,sparsity:0.8,label:more}]"  # full trie: 1 + 3 + 6 + 6 = 16 nodes



def _stats(run_dir: Path) -> dict:
    return json.loads((run_dir / STATS_FILE).read_text())


def _assert_same_keys(part: pd.DataFrame, full: pd.DataFrame) -> None:
    """Every node of a cut run has the store key the full trie gives it (so the full run reuses it)."""
    keys = lambda df: df.drop_duplicates("order").set_index("order")["node_key"]  # noqa: E731
    pd.testing.assert_series_equal(keys(part), keys(full).loc[keys(part).index])


def _base(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("hydra.run.dir")] + ["eval.backends=none"]


def test_validate_shows_the_cut_plan_and_what_it_saves(tiny_overrides, capsys):
    assert exit_code(["validate", *_base(tiny_overrides), THREE, "predict_only=true", "joint=[sparsegpt_gptq]"]) == 0
    out = capsys.readouterr().out
    assert "predict only: 3 single stages (of 7 orders, 16 stage applications)" in out
    # the joint schedule is a full order: not run either
    assert "plan: 1 job(s), 4 nodes, 4 distinct, 0 stored; to do: 3 stage applications, 4 evaluations" in out
    assert "predict_only: 4 of 17 distinct nodes (dense and single stages); saves 13 of 16 stage applications" in out
    assert exit_code(["validate", *_base(tiny_overrides), "predict_only=true", "save=true"]) == 2
    assert exit_code(["validate", *_base(tiny_overrides), "predict_only=maybe"]) == 2


def test_predict_only_runs_n_plus_1_nodes_and_a_full_run_reuses_them(tiny_overrides, tmp_path):
    base = tiny_overrides + ["eval.backends=none", THREE]
    pred = run(compose_config(base + ["predict_only=true"]), tmp_path / "p")
    stats = _stats(tmp_path / "p")
    assert (stats["nodes"], stats["evaluations"], stats["applications"]) == (4, 4, 3)  # n + 1 nodes, n stages
    assert set(pred["order"]) == {"dense", "magnitude", "rtn", "more"} and set(pred["depth"]) == {0, 1}

    # the predicted order: stages by how much each alone raises perplexity over dense, weaker first
    ppl = pred[(pred["metric"] == "perplexity") & (pred["backend"] == "dense-simulated")].set_index("order")["value"]
    expected = " > ".join(sorted(["magnitude", "rtn", "more"], key=lambda s: ppl[s] - ppl["dense"]))
    written = pd.read_csv(tmp_path / "p" / "predicted.csv")
    assert written["predicted"].tolist() == [expected]
    assert written["intensity"].iloc[0].startswith(expected.split(" > ")[0] + " ")
    summary = (tmp_path / "p" / "summary.md").read_text()
    assert f"| {expected} |" in summary and "◀ best" not in summary  # no full order was run to be best
    assert "not run: 12 nodes, 12 stage applications" in (tmp_path / "p" / "predicted.md").read_text()

    # the full run finds the four nodes stored under the same keys and evaluates only the other twelve
    full = run(compose_config(base), tmp_path / "f")
    stats = _stats(tmp_path / "f")
    assert (stats["evaluations"], stats["from_store"]) == (12, 4)
    _assert_same_keys(pred, full)
    assert not (tmp_path / "f" / "predicted.md").exists()

    # analyze over the predict-only run: a table without full orders, the prediction in the PIH section
    text = write_report(collect.collect([tmp_path / "p"]), tmp_path / "report", n_boot=0, plots=False)
    assert "no full order in these runs" in (tmp_path / "report" / "table.md").read_text() and expected in text


def test_listed_orders_run_with_their_prefixes_and_a_full_run_reuses_them(tiny_overrides, tmp_path, capsys):
    """orders=[[...]]: only the listed full orders and their prefixes are computed, under the keys of the whole trie
    (one quantize-first order under a new setting need not recompute the other orders)."""
    base = tiny_overrides + ["eval.backends=none", THREE]
    listed = "orders=[[rtn,more,magnitude],[rtn,magnitude,more]]"
    assert exit_code(["validate", *base, listed]) == 0
    assert "2 listed orders, 5 stage applications (of 6 orders, 15 stage applications)" in capsys.readouterr().out
    part = run(compose_config(base + [listed]), tmp_path / "o")
    assert set(part["order"]) == {"dense", "rtn", "rtn > more", "rtn > magnitude", "rtn > more > magnitude",
                                  "rtn > magnitude > more"}  # fmt: skip
    assert _stats(tmp_path / "o")["applications"] == 5
    assert "2 of the 6 orders ran (`orders=`)" in (tmp_path / "o" / "summary.md").read_text()
    full = run(compose_config(base), tmp_path / "f")
    stats = _stats(tmp_path / "f")
    assert (stats["evaluations"], stats["from_store"]) == (10, 6)
    _assert_same_keys(part, full)


def test_a_predict_only_sweep_gathers_the_predictions(tiny_overrides, tmp_path, capsys):
    assert exit_code(["run", "-m", *_base(tiny_overrides), "predict_only=true", "sparsity=0.5,0.7"]) == 0
    out = capsys.readouterr().out
    assert "predict_only: 4 of 8 distinct nodes" in out and "predicted orders (PIH, weaker first)" in out
    sweep = tmp_path / "sweep"
    assert sum(_stats(sweep / j)["evaluations"] for j in ("0", "1")) == 4  # dense and rtn shared by both jobs
    gathered = pd.read_csv(sweep / "predicted.csv")
    assert gathered["sparsity"].tolist() == [0.5, 0.7] and gathered["predicted"].notna().all()


# --- agreement of the prediction with the measured winner, on hand-built run folders ------------------------------

UNITS = 200
ALTERNATE = np.tile([0.5, -0.5], UNITS // 2)  # zero-mean per-window noise: the order's mean is unchanged


def _write_run(run_dir: Path, model: str, bits: int, shifts: dict[str, float], noisy: str | None = None) -> None:
    """A run folder of perplexity rows from per-window NLLs: a shared base plus each order's shift; `noisy` gets
    ±0.5 per window, so its difference from any other order has a wide interval around the same mean."""
    ctx = dict(model=model, dataset="d", stages="magnitude,rtn", bits=bits, sparsity=0.5, group_size=128, seed=0)
    base = np.linspace(1.5, 2.5, UNITS)
    results, samples = [], []
    for order, shift in shifts.items():
        nll = base + shift + (ALTERNATE if order == noisy else 0.0)
        key = f"{model}|{bits}|{order}"
        results.append({**{c: None for c in COLUMNS}, "run_id": "r", **ctx, "order": order,
                        "depth": 0 if order == "dense" else len(order.split(" > ")), "metric": "perplexity",
                        "value": float(np.exp(nll.mean())), "higher_is_better": METRICS["perplexity"].higher_is_better,
                        "backend": "dense-simulated", "status": "ok", "error": "", "node_key": key, "timestamp": "t"})
        samples.append(pd.DataFrame({"order": order, "node_key": key, "metric": "nll", "unit": np.arange(UNITS),
                                     "value": nll}))  # fmt: skip
    write_fake_run(run_dir, results, samples)


def _shifts(mag: float, rtn: float, mag_first: float, rtn_first: float) -> dict[str, float]:
    return {"dense": 0.0, "magnitude": mag, "rtn": rtn, "magnitude > rtn": mag_first, "rtn > magnitude": rtn_first}


def test_analyze_reports_agreement_per_model_and_stage_pair(tmp_path):
    root = tmp_path / "sweep"
    # model m: bits 2 predicted and won (significant); 3 predicted magnitude first, rtn first won (significant);
    # 4 predicted rtn first, which won by 0.001 in NLL inside a ±0.5 per-window spread (not significant);
    # 5 equal intensities: no prediction, magnitude first won (significant). Model m2: one significant miss.
    _write_run(root / "0", "m", 2, _shifts(0.1, 0.4, 0.5, 0.7))
    _write_run(root / "1", "m", 3, _shifts(0.1, 0.4, 0.7, 0.5))
    _write_run(root / "2", "m", 4, _shifts(0.4, 0.1, 0.5, 0.499), noisy="rtn > magnitude")
    _write_run(root / "3", "m", 5, _shifts(0.3, 0.3, 0.5, 0.7))
    _write_run(root / "4", "m2", 3, _shifts(0.1, 0.4, 0.7, 0.5))
    out = tmp_path / "report"
    df = collect.collect([root])
    pred = pih.predictions(df, "perplexity").set_index(["model", "bits"])
    assert pred.loc[("m", 4), "predicted"] == "rtn > magnitude" and pred.loc[("m", 4), "why"] == ""
    assert pd.isna(pred.loc[("m", 5), "predicted"]) and pred.loc[("m", 5), "why"] == "tied intensities"
    text = write_report(df, out, n_boot=200, plots=False)
    table = pd.read_csv(out / "agreement.csv").set_index("model")
    assert table.loc["m"].drop(["dataset", "stages", "rate"]).to_dict() == {
        "settings": 4, "decided": 3, "agree": 2, "significant": 3, "agree_significant": 1, "rate_significant": 0.5}
    assert table.loc["m", "rate"] == 2 / 3
    counts = ["settings", "decided", "agree", "significant", "agree_significant"]
    assert table.loc["m2", counts].tolist() == [1, 1, 0, 1, 0]
    assert (out / "agreement.md").read_text().count("| magnitude,rtn |") == 2 and (out / "agreement.tex").is_file()
    assert "## Can the prediction from singles be trusted?" in text


def test_an_order_may_name_a_stage_by_its_name_where_one_stage_has_it():
    """`orders=[[gptq,sparsegpt]]` for the label `sparsegpt(grid=refit)`, which a shell would need quoted; a name
    two stages share stays ambiguous and must be given by label."""
    from compress_order.config.settings import run_settings

    s = run_settings(compose_config(["stages=[{name:sparsegpt,grid:refit},gptq]", "orders=[[gptq,sparsegpt]]"]))
    assert s.orders == (("gptq", "sparsegpt(grid=refit)"),)
    assert exit_code(["validate", "stages=[magnitude,{name:magnitude,sparsity:0.8,label:more}]",
                      "orders=[[magnitude,magnitude]]"]) == 2  # fmt: skip
