"""scripts/real_models.py on the tiny LLaMA: a finished cell is kept (committed folder), not recomputed, and the
document and README table are regenerated from the kept copy alone; a bad --budget-min is refused."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from helpers import load_script

ARGS = ["--models", "smollm2", "--pairs", "sparsegpt-gptq", "--bits", "4", "--seeds", "0", "--n-boot", "200", "--grids", "keep"]


@pytest.fixture
def study(tiny_overrides, tmp_path, monkeypatch):
    mod = load_script("real_models")
    tiny = [o for o in tiny_overrides if not o.startswith(("hydra.", "store_dir="))]

    def overrides(cell, args):  # the cell's stages and targets on the tiny model instead of the GGUF checkpoint
        return [*tiny, f"stages={cell.stages()}", f"bits={cell.bits}", "group_size=16", "sparsity=0.5", "seeds=[0]",
                "eval.metrics=[perplexity,kld,top1_agree]", "eval.backends=none", "eval.latency.decode_tokens=0",
                "eval.kld_topk=8", f"store_dir={args.out / 'store'}"]  # fmt: skip

    monkeypatch.setattr(mod, "overrides", overrides)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    (tmp_path / "README.md").write_text(f"intro\n{mod.START}\nold table\n{mod.END}\nrest\n")
    paths = ["--out", str(tmp_path / "out"), "--kept", str(tmp_path / "kept"), "--doc", str(tmp_path / "doc.md")]
    return mod, paths, tmp_path


def test_a_finished_cell_is_kept_and_the_document_regenerates_from_it_alone(study, monkeypatch):
    mod, paths, tmp = study
    assert mod.main([*ARGS, "--patterns", "50%", *paths]) == 0
    kept = tmp / "kept" / "smollm2" / "sparsegpt-gptq-w4-50pct"
    for name in (*mod.KEEP, "config.yaml"):
        assert (kept / name).is_file(), name
    assert json.loads((tmp / "kept" / "cells.json").read_text())["smollm2/sparsegpt-gptq-w4-50pct"]["seeds"] == 1
    doc = (tmp / "doc.md").read_text()
    row = next(ln for ln in doc.splitlines() if ln.startswith("| [sparsegpt, gptq] W4 g32 | 1 |"))
    readme = (tmp / "README.md").read_text()
    assert "old table" not in readme and readme.startswith("intro\n") and readme.endswith("rest\n")
    assert "| tiny | [sparsegpt, gptq] W4 g32 | 1 |" in readme
    # the sentence under the table is generated with it: how much ran, and what it says
    assert re.search(r"\n1 of the protocol's 1 cells ran with their rows kept in docs/real-models/\. Of its 1 "
                     r"settings with both orders: the pruner first wins in [01] by perplexity and "
                     r"[01] by KLD; the PIH prediction from the singles is right in [01] of 1 by perplexity;", readme)

    # the store is gone (a fresh clone): nothing is recomputed, the same table comes from the kept copy
    shutil.rmtree(tmp / "out")
    monkeypatch.setattr(mod, "run", lambda *a, **kw: pytest.fail("a kept cell was recomputed"))
    assert mod.main([*ARGS, "--patterns", "50%", *paths]) == 0
    assert row in (tmp / "doc.md").read_text().splitlines()
    assert mod.main([*ARGS, "--patterns", "50%", "--render-only", *paths]) == 0
    assert row in (tmp / "doc.md").read_text().splitlines()


def test_a_cell_stopped_part_way_is_kept_as_partial_and_computed_whole_later(study, monkeypatch):
    mod, paths, tmp = study
    assert mod.main([*ARGS, "--patterns", "50%", *paths]) == 0
    # a killed run of the 2:4 cell: rows in the store, no summary.md (the runner writes it last)
    stopped = tmp / "out" / "smollm2" / "sparsegpt-gptq-w4-2of4"
    shutil.copytree(tmp / "out" / "smollm2" / "sparsegpt-gptq-w4-50pct", stopped)
    (stopped / "summary.md").unlink()
    both = [*ARGS, "--patterns", "50%", "2:4", *paths]
    assert mod.main([*both, "--render-only"]) == 0
    log = json.loads((tmp / "kept" / "cells.json").read_text())
    assert log["smollm2/sparsegpt-gptq-w4-2of4"]["partial"] is True
    assert (tmp / "kept" / "smollm2" / "sparsegpt-gptq-w4-2of4" / "results.parquet").is_file()
    assert "| smollm2/sparsegpt-gptq-w4-2of4 (stopped part-way) | 1 |" in (tmp / "doc.md").read_text()
    readme = (tmp / "README.md").read_text()
    assert "2 of the protocol's 2 cells ran with their rows kept in docs/real-models/ (1 stopped part-way)." in readme
    calls = []
    monkeypatch.setattr(mod, "run", lambda cfg, out: calls.append(out.name))
    monkeypatch.setattr(mod, "keep", lambda *a: None)
    assert mod.main(both) == 0
    assert calls == ["sparsegpt-gptq-w4-2of4"]  # the finished cell is not recomputed, the partial one is


def test_the_budget_starts_only_cells_expected_to_end_in_time(study, monkeypatch):
    mod, paths, tmp = study
    (tmp / "kept").mkdir()
    # per seed: 20 min for [sparsegpt, gptq] on smollm2 (the median of 10, 20, 30), so one seed expects 20 min
    log = {f"smollm2/sparsegpt-gptq-w3-{p}": {"cell": f"smollm2/sparsegpt-gptq-w3-{p}", "seeds": 3, "wall_min": w}
           for p, w in (("50pct", 30), ("2of4", 60), ("25pct", 90))}  # fmt: skip
    (tmp / "kept" / "cells.json").write_text(json.dumps(log))
    now, calls = [0.0], []

    def clock():  # each reading is a minute later, and a cell takes 25 min
        now[0] += 60
        return now[0]

    def run(cfg, out):
        calls.append(out.name)
        now[0] += 25 * 60

    monkeypatch.setattr(mod, "clock", clock)
    monkeypatch.setattr(mod, "run", run)
    monkeypatch.setattr(mod, "keep", lambda *a: None)
    both = [*ARGS, "--patterns", "50%", "2:4", *paths]
    assert mod.main([*both, "--budget-min", "15"]) == 0
    assert calls == []  # 20 min expected, under 15 left
    assert mod.main([*both, "--budget-min", "23"]) == 0
    assert calls == ["sparsegpt-gptq-w4-50pct"]  # its 25 min spend the budget before the second
    assert mod.expected_min(log, mod.Cell("smollm2", "wanda-awq", 4, "50%"), 3) == 60  # of the model, any pair
    assert mod.expected_min(log, mod.Cell("gemma3_270m", "wanda-awq", 4, "50%"), 3) is None


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_a_budget_that_is_not_minutes_above_zero_is_refused_before_anything_runs(study, value, capsys, monkeypatch):
    mod, paths, tmp = study
    monkeypatch.setattr(mod, "run", lambda *a, **kw: pytest.fail("a cell ran on a bad budget"))
    with pytest.raises(SystemExit) as stop:
        mod.main([*ARGS, "--budget-min", value, *paths])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--budget-min: {value!r} is not a number of minutes above 0" in err
    assert not (tmp / "doc.md").exists()  # nothing rendered either


def test_the_rotation_cell_reports_the_pair_with_and_without_rotation(study):
    mod, paths, tmp = study
    args = ["--models", "smollm2", "--pairs", "rotate-gptq-sparsegpt", "--bits", "4", "--patterns", "50%",
            "--seeds", "0", "--n-boot", "200", *paths]  # fmt: skip
    assert [c.folder for c in mod.cells(["smollm2"], ["rotate-gptq-sparsegpt"], [4], ["50%"])] == [
        "smollm2/rotate-gptq-sparsegpt-w4-50pct"
    ]
    assert mod.main(args) == 0
    doc = (tmp / "doc.md").read_text().splitlines()
    assert "## Rotation (QuaRot's rotation before the pair)" in doc
    rows = [ln for ln in doc if ln.startswith("| tiny | 4 | ")]
    assert len(rows) == 2 and all(ln.count("|") == 13 and "[" in ln.split("|")[-2] for ln in rows), rows
    assert "—" not in rows[0]  # every node of the table ran: the rotated orders, the pair and the singles


def test_a_refit_cell_reruns_its_kept_twin_then_only_the_quantize_first_order_and_pairs_them(study):
    """#42: a refit cell computes its kept twin again and `gptq > sparsegpt` (grid=refit) with its prefix from the
    same store; the document pairs the refit order with the twin's prune-first order on the same windows and
    reports A and the verdict under both settings."""
    mod, paths, tmp = study
    args = [*ARGS[:-2], "--grids", "keep", "refit", "--patterns", "50%", *paths]
    assert [c.folder for c in mod.cells(["smollm2"], ["sparsegpt-gptq"], [4], ["50%"])] == [
        "smollm2/sparsegpt-gptq-w4-50pct", "smollm2/sparsegpt-gptq-w4-50pct-refit"
    ]  # fmt: skip
    assert mod.main(args) == 0
    cell = tmp / "kept" / "smollm2/sparsegpt-gptq-w4-50pct-refit"
    keep, refit = (pd.read_parquet(cell / part / "results.parquet") for part in ("keep", "refit"))
    assert set(refit["order"]) == {"dense", "gptq", "gptq > sparsegpt-refit"}  # the prune-first order is reused
    assert set(keep["order"]) == {"dense", "gptq", "sparsegpt", "gptq > sparsegpt", "sparsegpt > gptq"}
    ppl = lambda df, o: df[(df["order"] == o) & (df["metric"] == "perplexity")]["value"].iloc[0]  # noqa: E731
    assert ppl(refit, "gptq") == ppl(keep, "gptq")  # the refit order's prefix is the keep run's own node
    assert json.loads((tmp / "kept" / "cells.json").read_text())["smollm2/sparsegpt-gptq-w4-50pct-refit"]["refit_min"] >= 0
    assert mod.computed(tmp / "out" / "smollm2/sparsegpt-gptq-w4-50pct-refit" / "refit")
    assert mod.main([*args, "--rerun"]) == 0  # every node from the store: no extra cost to record
    assert "refit_min" not in json.loads((tmp / "kept" / "cells.json").read_text())["smollm2/sparsegpt-gptq-w4-50pct-refit"]
    doc = (tmp / "doc.md").read_text()
    assert "## Quantize then prune: the earlier grid kept or refit" in doc and "Left out" not in doc
    assert "the same nodes differ by up to 0%" in doc  # the tables above ran with the same code here
    assert "beyond dense, 0 rose and 0 fell; in 0 of " in doc
    rows = [ln for ln in doc.splitlines() if ln.startswith("| tiny | [sparsegpt, gptq] W4 g32 | 1 |")]
    assert len(rows) == 1  # the keep/refit table (the pair's table above lists its model in a heading)
    row = rows[0].split(" | ")
    assert float(row[3]) == pytest.approx(ppl(keep, "sparsegpt > gptq"), rel=1e-3)
    assert float(row[4]) == pytest.approx(ppl(keep, "gptq > sparsegpt"), rel=1e-3)
    assert float(row[5]) == pytest.approx(ppl(refit, "gptq > sparsegpt-refit"), rel=1e-3)
    assert " → " in row[-2] and " → " in row[-1]
    assert "PIH (weaker stage first, from the singles) right by perplexity in" in doc
    assert "With the earlier grid refit instead of kept" in (tmp / "README.md").read_text()

    # a refit run that does not share the keep run's nodes (another version, another store) is not paired
    df = pd.read_parquet(cell / "refit" / "results.parquet")
    df.loc[df["order"] == "gptq", "value"] *= 1.01
    df.to_parquet(cell / "refit" / "results.parquet")
    assert mod.main([*args, "--render-only"]) == 0
    doc = (tmp / "doc.md").read_text()
    assert "Left out (their refit run does not share the keep run's nodes" in doc and "smollm2/sparsegpt-gptq-w4-50pct-refit." in doc
    assert not [ln for ln in doc.splitlines() if ln.startswith("| tiny | [sparsegpt, gptq] W4 g32 | 1 |")]


def test_drift_between_versions_counts_moves_and_groups_beyond_the_seed_spread(tmp_path):
    """The document's account of how nodes computed by two versions differ: rises and falls beyond dense, and the
    (order, metric) groups whose largest move exceeds the older version's spread over seeds."""
    mod = load_script("real_models")

    def run(name, values):  # {(order, depth, metric): [value per seed]}
        rows = [{"order": o, "depth": d, "metric": m, "backend": "none", "seed": s, "value": v}
                for (o, d, m), vs in values.items() for s, v in enumerate(vs)]  # fmt: skip
        (tmp_path / name).mkdir()
        pd.DataFrame(rows).to_parquet(tmp_path / name / "results.parquet")
        return tmp_path / name

    old = run("old", {("dense", 0, "perplexity"): [10, 10], ("gptq", 1, "perplexity"): [20, 22],  # spread 2/21
                      ("gptq", 1, "kld"): [0.5, 0.5], ("a > b", 2, "perplexity"): [30, 40]})  # fmt: skip
    new = run("new", {("dense", 0, "perplexity"): [11, 10], ("gptq", 1, "perplexity"): [21, 22],  # 5% < 9.5%
                      ("gptq", 1, "kld"): [0.4, 0.5],  # 20% > a spread of 0
                      ("a > b", 2, "perplexity"): [33, 36]})  # 10% both ways < 29%  # fmt: skip
    assert mod.drift_against_seeds([(old, new)]) == (2, 2, 1, 3)  # dense is left out; equal values count neither way
