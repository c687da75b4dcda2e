"""Stages as data: one label rule, no commas in labels, and the stage list recorded in the results."""

from __future__ import annotations

import json

from compress_order.analysis.collect import collect
from compress_order.analysis.tables import order_pattern, order_table, seed_dependent, stage_kind
from compress_order.cli.main import main
from compress_order.config.compose import compose_config
from helpers import run
from compress_order.config.stages import entry_label


def test_labels_follow_one_rule():
    assert entry_label("magnitude") == "magnitude"
    assert entry_label({"name": "magnitude", "sparsity": 0.3, "scope": "row"}) == "magnitude(scope=row;sparsity=0.3)"
    assert entry_label("sparsegpt_gptq") == "sparsegpt+gptq"  # the yaml's own label
    assert entry_label({"name": "rtn", "label": "q"}) == "q"


def test_an_entry_with_two_overrides_tables_as_two_stages(tiny_overrides, tmp_path, capsys):
    over = tiny_overrides + ["eval.backends=none", "stages=[{name:magnitude,sparsity:0.3,scope:row},rtn]"]
    df = run(compose_config(over), tmp_path / "a")
    assert df["stages"].iloc[0] == "magnitude(scope=row;sparsity=0.3),rtn"
    table, _ = order_table(collect([tmp_path / "a"]), "perplexity")
    assert len(table) == 1 and {"magnitude(scope=row;sparsity=0.3) > rtn", "rtn > magnitude(scope=row;sparsity=0.3)"} <= set(table.columns)
    assert main(["table", str(tmp_path / "a")]) == 0 and "rtn > magnitude(scope=row;sparsity=0.3)" in capsys.readouterr().out


def test_custom_labels_are_traced_through_the_recorded_stage_list(tiny_overrides, tmp_path):
    over = tiny_overrides + ["eval.backends=none", "stages=[{name:wanda,label:p},{name:rtn,label:q}]"]
    df = run(compose_config(over), tmp_path / "a")
    stages = json.loads(df["stage_list"].iloc[0])
    assert [(s["label"], s["name"], s["kind"], s["calibrated"]) for s in stages] == [
        ("p", "wanda", "prune", True), ("q", "rtn", "quantize", False)]
    assert stages[1]["params"]["bits"] == 3 and "label" not in stages[1]["params"]
    collect([tmp_path / "a"])  # learns the labels' classes from the results
    assert stage_kind("p") == "prune" and stage_kind("q") == "quantize"
    assert seed_dependent("p > q") and not seed_dependent("q")
    assert order_pattern("q > p", "p,q") == "quantize > prune"
