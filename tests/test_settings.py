"""Each setting's type and range is declared once (compress_order/core/specs.py): the declaration names only keys
the yaml files have, and the root config and the stages that read a setting refuse a value with the same line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from compress_order.core.errors import UserError
from compress_order.core.paths import CONF_DIR
from compress_order.core.specs import ABSENT, SETTINGS, setting
from compress_order.stages.expert_prune import ExpertPrune
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.mixed import MixedRTN
from compress_order.stages.rtn import RTN


def test_every_declared_setting_is_a_key_of_the_yaml_schema():
    schema = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    schema["eval"] = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "eval" / "default.yaml"), resolve=False)
    missing = [k for k in SETTINGS if setting(schema, k) is ABSENT]
    assert not missing, f"declared but in no yaml file: {missing}"


@pytest.mark.parametrize("build,key,value", [
    (lambda v: RTN(v, name="r"), "bits", 9),
    (lambda v: RTN(4, v, name="r"), "group_size", 0),
    (lambda v: Magnitude(v, name="m"), "sparsity", 1.0),
])  # fmt: skip
def test_a_stage_refuses_a_value_with_the_root_configs_line(build, key, value):
    with pytest.raises(UserError) as stage:
        build(value)
    with pytest.raises(UserError) as root:
        SETTINGS[key].check(value, key)
    assert str(stage.value) == str(root.value)


def test_stage_parameters_of_their_own_name_the_stage_with_the_shared_range():
    with pytest.raises(UserError, match=r"^expert_prune expert_sparsity=1.0 is outside \[0, 1\)$"):
        ExpertPrune(1.0, name="e")
    with pytest.raises(UserError, match=r"^bits_map\['x'\]=1 is outside 2-8 \(an integer\)$"):
        MixedRTN(bits=3, bits_map={"x": 1}, name="m")
