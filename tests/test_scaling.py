"""Input-rescaling stages (AWQ, SmoothQuant) and activation quantization: scaling pairs found from structure, the
model's function kept by smoothing, constraints in every order (or the order reported infeasible), snapshots that
restore norms, quality bars on the embedded model, and one-line errors."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from helpers import FAMILIES, family_config, settings, terminal_lines, tiny_llama_model, token_batches

from compress_order.core.settings import Calibration
from compress_order.modeling.act import ActQuant, fake_quant
from compress_order.stages.calibration import calibrate_and_compress
from compress_order.config.compose import compose_config
from compress_order.core.errors import UserError
from compress_order.core.instantiate import build
from compress_order.run.pipeline import apply_stage
from helpers import run
from compress_order.config.stages import build_stage, stage_configs
from compress_order.stages.awq import AWQ
from compress_order.stages.rtn import RTN
from compress_order.stages.smoothquant import SmoothQuant
from compress_order.modeling.targets import ModelState, find_targets
from compress_order.evaluation.tasks import build_task


def mha_llama(layers: int = 2):
    """Tiny LLaMA with as many K/V heads as query heads, so V → O is a scaling pair too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


class Batches:
    """What apply_stage asks of a task."""

    def __init__(self, batches):
        self.batches = batches

    def calibration_batches(self):
        return self.batches


def test_scaling_pairs_are_found_from_structure(caplog):
    model = mha_llama()
    targets = find_targets(model, ["lm_head"])
    with caplog.at_level("INFO", logger="compress_order"):
        calibrate_and_compress(model, targets, token_batches(4), SmoothQuant(alpha=0.5, name="sq"))
    line = next(r.getMessage() for r in caplog.records if "scaling pairs" in r.getMessage())
    assert line == ("scaling pairs in LlamaDecoderLayer: input_layernorm → q_proj/k_proj/v_proj; self_attn.v_proj → "
                    "o_proj; post_attention_layernorm → gate_proj/up_proj; mlp.up_proj → down_proj")  # fmt: skip


def test_scaling_pairs_are_found_in_half_precision(caplog):
    model = mha_llama().to(torch.bfloat16)
    with caplog.at_level("INFO", logger="compress_order"):
        calibrate_and_compress(model, find_targets(model, ["lm_head"]), token_batches(4), SmoothQuant(name="sq"))
    line = next(r.getMessage() for r in caplog.records if "scaling pairs" in r.getMessage())
    assert "none" not in line, line


def test_grouped_query_attention_has_no_v_to_o_pair(caplog):
    model = tiny_llama_model()  # 4 query heads, 2 K/V heads: V's 32 outputs cannot absorb O's 64 input factors
    with caplog.at_level("INFO", logger="compress_order"):
        calibrate_and_compress(model, find_targets(model, ["lm_head"]), token_batches(4), SmoothQuant(name="sq"))
    line = next(r.getMessage() for r in caplog.records if "scaling pairs" in r.getMessage())
    assert "none → o_proj" in line and "input_layernorm → q_proj/k_proj/v_proj" in line


def test_smoothing_alone_keeps_the_function_and_the_snapshot_restores_norms():
    model = mha_llama()
    targets = find_targets(model, ["lm_head"])
    state = ModelState(model, targets)
    dense = state.snapshot()
    ids = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        apply_stage(SmoothQuant(alpha=0.8, name="sq"), state, Batches(token_batches(4)), Calibration())
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm.data, dense["param:model.layers.0.input_layernorm.weight"][0])  # it was rescaled
    assert not state.equal(dense)
    state.restore(dense)
    assert state.equal(dense)  # norms too: a sibling starts from its parent exactly
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


PAIR_STAGES = ["awq", "smoothquant", "magnitude", "wanda", "sparsegpt", "rtn", "gptq"]


@pytest.fixture(scope="module")
def pair_setup():
    model = mha_llama()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    return state, state.snapshot(), Batches(token_batches(4, seqlen=16))


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("first,second", list(itertools.permutations(PAIR_STAGES, 2)))
def test_every_ordered_pair_keeps_its_constraints_or_is_infeasible(first, second, group_size, pair_setup):
    state, dense, task = pair_setup
    cfg = compose_config([f"stages=[{first},{second}]", "bits=4", "sparsity=0.5", f"group_size={group_size}",
                          "calibration.nsamples=4"])  # fmt: skip
    stages = [build_stage(sc) for sc in stage_configs(cfg)]
    state.restore(dense)
    whys = []
    for s in stages:
        s.validate(state.targets)
        whys.append(apply_stage(s, state, task, settings(cfg).calibration))  # invariants checked after each applied stage
        if whys[-1] is not None:
            break
    infeasible = second == "smoothquant" and first in ("rtn", "gptq", "awq") and group_size == -1
    assert (whys[-1] is not None) == infeasible
    if infeasible:
        assert "per-channel" in whys[-1] and "smoothquant after a quantizer" in whys[-1]
        return
    for t in state.targets.values():
        assert t.constraint.applied == [first, second]
        if {first, second} & {"magnitude", "wanda", "sparsegpt"}:
            assert t.constraint.mask is not None and (t.weight == 0).float().mean() >= 0.5 - 1e-6
        if {first, second} & {"awq", "rtn", "gptq"}:
            assert t.constraint.grid is not None and t.constraint.grid.bits == 4


def test_smoothing_after_a_group_quantizer_rescales_the_grid_exactly(pair_setup):
    state, dense, task = pair_setup
    state.restore(dense)
    cfg = compose_config(["calibration.nsamples=4"])
    apply_stage(RTN(bits=4, group_size=32, name="rtn"), state, task, settings(cfg).calibration)
    codes = {n: t.constraint.grid.codes(t.weight) for n, t in state.targets.items()}
    assert apply_stage(SmoothQuant(alpha=0.5, name="sq"), state, task, settings(cfg).calibration) is None
    changed = 0
    for n, t in state.targets.items():
        assert torch.equal(t.constraint.grid.project(t.weight), t.weight)  # still exactly on its (rescaled) grid
        assert torch.equal(t.constraint.grid.codes(t.weight), codes[n])  # the same integer codes
        changed += not torch.equal(t.weight, dense[n][0])
    assert changed > 0


def test_activation_fake_quant_per_token_and_per_tensor():
    x = torch.tensor([[1.0, -0.5, 0.26], [100.0, 3.0, -0.01]])
    q = fake_quant(x, 8, "token")
    assert torch.equal(q[:, 0], x[:, 0])  # each row's max is on its own grid
    assert (q - x).abs().max(-1).values.tolist() <= [1.0 / 127 / 2 + 1e-7, 100.0 / 127 / 2 + 1e-6]
    t = fake_quant(x, 8, "tensor")
    assert t[0, 2] == pytest.approx(round(0.26 / (100 / 127)) * 100 / 127)
    assert len(torch.unique(fake_quant(torch.randn(1000), 4, "tensor"))) <= 15


def test_activation_quant_hooks_keep_shared_inputs_shared():
    model = mha_llama(layers=1)
    targets = find_targets(model, ["lm_head"])
    act = ActQuant(8).install(targets)
    seen = {}
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
    with torch.no_grad():
        model(torch.randint(0, 40, (1, 8)))
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]  # one quantized tensor: the driver still groups them
    x = seen["q_proj"]
    assert torch.equal(fake_quant(x, 8, "token"), x)  # already on the per-token grid
    act.remove()


# ------------------------------------------------------------------------------------------ embedded model quality


@pytest.fixture(scope="module")
def embedded_lm():
    cfg = compose_config(["eval.max_windows=48", "calibration.nsamples=32", "device=cpu", "threads=2"])
    torch.manual_seed(0)
    lm = build(cfg.model)
    task = build_task(lm, build(cfg.data), settings(cfg))
    state = ModelState(lm.model, find_targets(lm.model, lm.skip))
    return cfg, lm, task, state, state.snapshot()


def _ppl(stages, embedded_lm, act_bits=None) -> float:
    cfg, lm, task, state, dense = embedded_lm
    state.restore(dense)
    act = ActQuant(act_bits).install(state.targets) if act_bits else None
    try:
        for s in stages:
            assert apply_stage(s, state, task, settings(cfg).calibration) is None
        return task.evaluate(lm.model)[0]["perplexity"]
    finally:
        if act is not None:
            act.remove()


@pytest.mark.slow
def test_awq_quality_bars_on_the_embedded_model(embedded_lm):
    # The char-LLaMA's layers have 128 or 512 inputs: group 128 is per channel for most of them.
    for bits in (3, 4):
        rtn = _ppl([RTN(bits=bits, group_size=128, name="rtn")], embedded_lm)
        awq = _ppl([AWQ(bits=bits, group_size=128, name="awq")], embedded_lm)
        assert awq <= rtn, (bits, awq, rtn)
    gptq = _ppl([build_stage(stage_configs(compose_config(["stages=[gptq]", "bits=4", "group_size=128"]))[0])],
                embedded_lm)
    assert awq <= gptq * 1.01, (awq, gptq)


@pytest.mark.slow
def test_smoothquant_w8a8_is_within_two_percent_of_dense(embedded_lm):
    dense = _ppl([], embedded_lm)
    w8a8 = _ppl([SmoothQuant(alpha=0.5, name="sq"), RTN(bits=8, group_size=-1, sym=True, name="rtn")], embedded_lm, 8)
    plain = _ppl([RTN(bits=8, group_size=-1, sym=True, name="rtn")], embedded_lm, 8)
    assert w8a8 <= dense * 1.02 and plain <= dense * 1.05, (dense, w8a8, plain)


# ------------------------------------------------------------------------------------------ runs and bad input


def test_run_reports_an_infeasible_order_and_runs_the_others(tiny_overrides, tmp_path):
    cfg = compose_config(tiny_overrides + ["stages=[smoothquant,rtn]", "group_size=-1", "act_bits=8"])
    df = run(cfg, tmp_path / "run")
    bad = df[df["status"] == "infeasible"]
    assert set(bad["order"]) == {"rtn > smoothquant"} and "per-channel" in bad["error"].iloc[0]
    ok = df[(df["status"] == "ok") & (df["metric"] == "perplexity")]
    assert set(ok["order"]) == {"dense", "smoothquant", "rtn", "smoothquant > rtn"}
    assert (ok["act_bits"] == 8).all()
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "`rtn > smoothquant`: smoothquant after a quantizer" in summary and "fake-quantized to 8 bits" in summary
    # the infeasible node is stored like any other: a second run computes nothing
    df2 = run(cfg, tmp_path / "run2")
    assert pd.read_json(tmp_path / "run2" / "run_stats.json", typ="series")["evaluations"] == 0
    assert set(df2.loc[df2["status"] == "infeasible", "order"]) == {"rtn > smoothquant"}


def test_static_activation_ranges_are_observed_per_node(tiny_overrides, tmp_path):
    model = mha_llama(layers=1)
    targets = find_targets(model, ["lm_head"])
    act = ActQuant(8, "static").install(targets)
    batches = token_batches(3)
    seen = {}
    for t in targets.values():
        t.module.register_forward_pre_hook(lambda m, a, name=t.name: seen.__setitem__(name, max(
            seen.get(name, 0.0), float(a[0].abs().amax()))))  # fmt: skip
    with torch.no_grad():
        act.observe(model, batches)  # quantization paused while observing: these are full-precision ranges
    assert {n: float(act.ranges[id(t.module)]) for n, t in targets.items()} == pytest.approx(seen)
    act.remove()
    cfg = compose_config(tiny_overrides + ["stages=[wanda,rtn]", "act_bits=4", "act_granularity=static"])
    static = run(cfg, tmp_path / "static")
    dynamic = run(compose_config(tiny_overrides + ["stages=[wanda,rtn]", "act_bits=4"]), tmp_path / "dynamic")
    ppl = [d[(d["metric"] == "perplexity")].set_index("order")["value"] for d in (static, dynamic)]
    assert set(ppl[0].index) == set(ppl[1].index) and (ppl[0] != ppl[1]).all()  # every node, the dense one too


def test_activation_bits_change_the_node_keys(tiny_overrides, tmp_path):
    from compress_order.run.identity import base_identity, digest

    keys = {digest(base_identity(settings(compose_config(tiny_overrides + over)))) for over in
            ([], ["act_bits=8"], ["act_bits=4"], ["act_bits=8", "act_granularity=tensor"],
             ["act_bits=8", "act_granularity=static"])}  # fmt: skip
    assert len(keys) == 5


def test_awq_on_a_model_without_scaling_pairs_is_one_line():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    targets = find_targets(model)
    with pytest.raises(UserError, match="no layer group of Sequential .* has a producer"):
        calibrate_and_compress(model, targets, [torch.randn(1, 3, 8, 8)], AWQ(bits=4, group_size=-1, name="awq"))
    assert all(t.constraint.grid is None for t in targets.values())  # said before any change


def test_cli_awq_on_a_cnn_is_one_line_and_exit_2(tmp_path, capsys):
    from compress_order.cli.main import main

    with pytest.raises(SystemExit) as e:  # errors inside the Hydra job leave through SystemExit
        main(["run", "model=mnist_resnet", "data=mnist", "stages=[awq]", "group_size=-1", "eval.max_examples=64",
              "calibration.nsamples=8", f"hydra.run.dir={tmp_path / 'run'}", f"store_dir={tmp_path / 'store'}"])
    rc = e.value.code
    err = terminal_lines(capsys.readouterr().err)  # the progress bar is cleared, the error stays
    assert rc == 2 and len(err) == 1 and "rescales input channels, but no layer group of" in err[0], err


# ------------------------------------------------------------------------------------------ decoder families

# Pairs the probe must find in the first block of each family of the decoder matrix (test_families.FAMILIES):
# norm → the layers it feeds, and linear → linear through attention's V mixing or an elementwise/ReLU path.
FAMILY_PAIRS = {
    "LLaMA": ["input_layernorm → q_proj/k_proj/v_proj", "post_attention_layernorm → gate_proj/up_proj",
              "mlp.up_proj → down_proj"],
    "Mistral": ["input_layernorm → q_proj/k_proj/v_proj", "mlp.up_proj → down_proj"],
    "Qwen2": ["input_layernorm → q_proj/k_proj/v_proj", "mlp.up_proj → down_proj"],
    "OPT": ["self_attn_layer_norm → q_proj/k_proj/v_proj", "self_attn.v_proj → out_proj", "final_layer_norm → fc1",
            "fc1 → fc2"],
    "GPT-2": ["ln_1 → c_attn", "ln_2 → c_fc"],
    "GPT-NeoX": ["input_layernorm → query_key_value", "post_attention_layernorm → dense_h_to_4h"],
    "Phi-3": ["input_layernorm → qkv_proj", "post_attention_layernorm → gate_up_proj"],
    "Gemma2": ["input_layernorm (1+w) → q_proj/k_proj/v_proj", "mlp.up_proj → down_proj"],
    "Falcon": ["input_layernorm → query_key_value/dense_h_to_4h"],
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILY_PAIRS))
def test_scaling_stages_on_every_decoder_family(family, caplog):
    from transformers import AutoModelForCausalLM

    assert set(FAMILY_PAIRS) == set(FAMILIES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, 40)).eval()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    dense = state.snapshot()
    task, cfg = Batches(token_batches(4)), compose_config(["calibration.nsamples=4"])
    ids = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with caplog.at_level("INFO", logger="compress_order"):
            assert apply_stage(SmoothQuant(alpha=0.5, name="sq"), state, task, settings(cfg).calibration) is None
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)  # the function is kept
    line = next(r.getMessage() for r in caplog.records if "scaling pairs" in r.getMessage())
    for pair in FAMILY_PAIRS[family]:
        assert pair in line, (pair, line)
    state.restore(dense)
    assert apply_stage(AWQ(bits=4, group_size=32, name="awq"), state, task, settings(cfg).calibration) is None  # invariants checked
    assert all(t.constraint.grid is not None for t in state.targets.values())
