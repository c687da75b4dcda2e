"""Every config of every group composes (and every stage builds): globbed, so new files are tested too."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from compress_order.config import compose_config
from compress_order.paths import group_options
from compress_order.stages import build_stage, stage_configs
from compress_order.validate import check_config


@pytest.mark.parametrize("group", ["model", "data", "eval"])
def test_group_configs_compose(group):
    options = group_options(group)
    assert options, f"conf/{group}/ is empty"
    for name in options:
        cfg = compose_config([f"{group}={name}"])
        check_config(cfg)
        assert "_target_" in cfg[group] or group == "eval"


@pytest.mark.parametrize("name", group_options("stage"))
def test_stage_configs_build(name):
    cfg = compose_config([f"stages=[{name}]", "bits=4", "sparsity=0.5"])
    (sc,) = stage_configs(cfg)
    stage = build_stage(sc)
    assert stage.label == sc["label"] and stage.kind in ("prune", "quantize", "joint")
    if stage.kind in ("quantize", "joint") and "bits" in sc:
        assert stage.bits == 4  # ${bits} reached the stage
    if stage.kind in ("prune", "joint") and sc.get("nm") is None and "sparsity" in sc:
        assert stage.sparsity == 0.5


def test_default_config_is_the_order_experiment():
    cfg = compose_config([])
    assert list(cfg.stages) == ["magnitude", "rtn"] and cfg.bits == 3 and cfg.sparsity == 0.7
    assert cfg.model.name == "charllama" and cfg.data.name == "shakespeare"


def test_stage_entry_with_overrides_gets_its_own_label():
    cfg = compose_config(["stages=[{name:magnitude,sparsity:0.3},rtn,magnitude]"])
    labels = [sc["label"] for sc in stage_configs(cfg)]
    assert labels == ["magnitude(sparsity=0.3)", "rtn", "magnitude"]
    assert stage_configs(cfg)[0]["sparsity"] == 0.3 and stage_configs(cfg)[2]["sparsity"] == 0.7


def test_llama_config_loads_from_a_local_dir(tiny_llama):
    cfg = compose_config(["model=llama", f"model.path={tiny_llama}", "model.dtype=float32"])
    lm = instantiate(cfg.model, _convert_="all")
    assert lm.kind == "causal_lm" and type(lm.model).__name__ == "LlamaForCausalLM"
