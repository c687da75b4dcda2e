"""Calibrated stages end to end: their configs build, a run with a joint stage finishes, and (slow) the quality they
reach on the embedded model."""

from __future__ import annotations

import math

import pytest

from compress_order.core.errors import UserError

# ----------------------------------------------------------------------------------------------- configs and runner


def test_stage_configs_build(tiny_overrides):
    from compress_order.config.compose import compose_config
    from compress_order.config.stages import build_stage, stage_configs

    cfg = compose_config(tiny_overrides + ["stages=[wanda,sparsegpt,gptq]", "joint=[sparsegpt_gptq]"])
    built = [build_stage(sc) for sc in stage_configs(cfg) + stage_configs(cfg, "joint")]
    assert [type(s).__name__ for s in built] == ["Wanda", "SparseGPT", "GPTQ", "SparseGPTGPTQ"]
    assert built[-1].label == "sparsegpt+gptq" and built[-1].kind == "joint"
    assert cfg.calibration.true_sequential is False
    bad = compose_config(tiny_overrides + ["stages=[{name: gptq, act_order: true}]", "group_size=64"])
    with pytest.raises(UserError, match="act_order"):
        build_stage(stage_configs(bad)[0])


def test_run_end_to_end_with_joint(tiny_overrides, tmp_path):
    from compress_order.config.compose import compose_config
    from helpers import run

    cfg = compose_config(
        tiny_overrides + ["stages=[wanda,gptq]", "joint=[sparsegpt_gptq]", "sparsity=0.5", "bits=4",
                          "group_size=32", "calibration.true_sequential=true", "device=cpu"]
    )  # fmt: skip
    df = run(cfg, tmp_path / "out")
    orders = set(df["order"])
    assert orders == {"dense", "wanda", "gptq", "wanda > gptq", "gptq > wanda", "sparsegpt+gptq"}
    sp = df[df.metric == "sparsity"].set_index("order")["value"]
    assert all(sp[o] >= 0.5 - 1e-9 for o in orders - {"dense", "gptq"})
    ppl = df[df.metric == "perplexity"].set_index("order")["value"]
    assert all(math.isfinite(v) for v in ppl)


def test_run_with_refit_grid_after_a_quantizer(tiny_overrides, tmp_path):
    """grid=refit changes only what follows a quantizer: sparsegpt alone and the prefix gptq are the keep run's."""
    from compress_order.config.compose import compose_config
    from helpers import run

    ppl, keys = {}, {}
    for mode, first in (("keep", "sparsegpt"), ("refit", "{name:sparsegpt,grid:refit}")):
        cfg = compose_config(
            tiny_overrides + [f"stages=[{first},gptq]", "sparsity=0.5", "bits=4", "group_size=32", "device=cpu"]
        )
        df = run(cfg, tmp_path / mode)
        sp = df[df.metric == "sparsity"].set_index("order")["value"]
        assert all(v >= 0.5 - 1e-9 for o, v in sp.items() if o not in ("dense", "gptq")), sp
        ppl[mode] = df[df.metric == "perplexity"].set_index("order")["value"].to_dict()
        keys[mode] = df[df.metric == "perplexity"].set_index("order")["node_key"].to_dict()
    label = "sparsegpt(grid=refit)"
    assert set(ppl["refit"]) == {"dense", label, "gptq", f"{label} > gptq", f"gptq > {label}"}, ppl["refit"]
    keep, refit = ppl["keep"], ppl["refit"]
    assert refit[label] == keep["sparsegpt"] and refit["gptq"] == keep["gptq"]
    assert refit[f"{label} > gptq"] == keep["sparsegpt > gptq"]  # no earlier grid: the setting changes nothing
    assert refit[f"gptq > {label}"] != keep["gptq > sparsegpt"] and math.isfinite(refit[f"gptq > {label}"])
    # where there is no earlier grid the setting is inert: one node, one key (computed once in a shared store)
    assert keys["refit"][label] == keys["keep"]["sparsegpt"]
    assert keys["refit"][f"{label} > gptq"] == keys["keep"]["sparsegpt > gptq"]
    assert keys["refit"][f"gptq > {label}"] != keys["keep"]["gptq > sparsegpt"]


# ----------------------------------------------------------------------------------------------- quality (slow)


@pytest.mark.slow
def test_quality_on_the_embedded_model(tmp_path):
    from compress_order.config.compose import compose_config
    from helpers import run

    ppl = {}
    for stages in ("[magnitude]", "[wanda]", "[sparsegpt]", "[rtn]", "[gptq]"):
        cfg = compose_config([
            f"stages={stages}", "sparsity=0.5", "bits=3", "group_size=-1", "calibration.nsamples=32",
            "device=cpu", f"store_dir={tmp_path / 'store'}",
        ])  # fmt: skip
        df = run(cfg, tmp_path / stages.strip("[]"))
        ppl[stages.strip("[]")] = float(df[(df.metric == "perplexity") & (df.depth == 1)]["value"].iloc[0])
    assert ppl["sparsegpt"] <= ppl["magnitude"] and ppl["wanda"] <= ppl["magnitude"], ppl
    assert ppl["gptq"] <= ppl["rtn"], ppl


def test_calibration_larger_than_the_text_is_a_one_line_error(tiny_overrides, capsys):
    from compress_order.cli.main import main

    args = [o for o in tiny_overrides if not o.startswith("calibration.nsamples")]
    with pytest.raises(SystemExit) as exc:
        main(["run", *args, "stages=[wanda]", "calibration.nsamples=100000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lower calibration.nsamples or calibration.seqlen" in err[0]
