"""A compressed-tensors checkpoint that compress-order exported can be passed back as `model.path`: it loads
decompressed, evaluates to the node's perplexity, and can be compressed further."""

from __future__ import annotations

import json

import pytest

from compress_order.cli.main import main


def test_an_exported_compressed_tensors_checkpoint_runs_again_at_the_nodes_perplexity(tiny_overrides, tmp_path):
    import pandas as pd

    over = [o for o in tiny_overrides if not o.startswith(("hydra.run.dir", "store_dir", "model.path"))]
    first = [*over, next(o for o in tiny_overrides if o.startswith("model.path")), f"hydra.run.dir={tmp_path / 'a'}",
             f"store_dir={tmp_path / 's1'}", "stages=[{name:rtn,sym:true}]",
             "bits=4", "group_size=32", "save=true", "save_format=compressed-tensors", "eval.backends=none"]  # fmt: skip
    assert main(["run", *first]) == 0
    (folder,) = (tmp_path / "a" / "models").iterdir()
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    df = pd.read_parquet(tmp_path / "a" / "results.parquet")
    node = df[(df.metric == "perplexity") & (df.depth == 1)]["value"].iloc[0]

    again = [*over, f"hydra.run.dir={tmp_path / 'b'}", f"store_dir={tmp_path / 's2'}", f"model.path={folder}",
             "stages=[rtn]", "bits=8", "group_size=32", "eval.backends=none"]  # fmt: skip
    assert main(["run", *again]) == 0
    df2 = pd.read_parquet(tmp_path / "b" / "results.parquet")
    dense = df2[(df2.metric == "perplexity") & (df2.order == "dense")]["value"].iloc[0]
    assert dense == pytest.approx(node, rel=1e-6)
    assert df2[(df2.metric == "perplexity") & (df2.order == "rtn")]["status"].iloc[0] == "ok"
