"""Activation quantization of fused MoE experts (act.py, moe.routed_forward): the hidden states entering the
experts and the gated intermediate entering each expert's down_proj are rounded, for every MoE family."""

from __future__ import annotations

import pytest
import torch

from compress_order.modeling.act import ActQuant, fake_quant, paused
from compress_order.numerics.formats import codebook
from compress_order.modeling.moe import routed_forward
from compress_order.modeling.targets import find_targets
from helpers import MOE_FAMILIES, exit_code, moe_config


def _model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(moe_config(family, 40)).eval()


def _experts(model) -> list:
    return list({id(t.module): t.module for t in find_targets(model, ["lm_head"]).values() if t.index is not None}.values())


def _ids() -> torch.Tensor:
    return torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_experts_call_computed_expert_by_expert_is_the_modules_own(family):
    model = _model(family)
    calls = []
    for m in _experts(model):
        m.register_forward_hook(lambda mod, a, kw, out: calls.append((mod, a, kw, out)), with_kwargs=True)
    with torch.no_grad():
        model(_ids())
    assert calls
    for mod, a, kw, out in calls:
        torch.testing.assert_close(routed_forward(mod, a, kw), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt,bits", [(None, 8), ("fp8", 8)])
def test_down_proj_inputs_are_rounded_per_token_and_the_output_follows(fmt, bits):
    model = _model("Qwen3-MoE")
    targets = find_targets(model, ["lm_head"])
    with torch.no_grad():
        ref = model(_ids()).logits
    act = ActQuant(bits, "token", fmt).install(targets)
    (experts, *_) = _experts(model)
    seen = []
    quant = experts.act_quant
    experts.act_quant = lambda h: seen.append((h, quant(h))) or seen[-1][1]
    with torch.no_grad():
        out = model(_ids()).logits
        with paused():
            same = model(_ids()).logits
    assert seen and torch.equal(same, ref) and not torch.allclose(out, ref)
    for h, q in seen:  # each routed token's intermediate on its own grid
        torch.testing.assert_close(q, fake_quant(h, bits, "token", fmt=fmt))
        if fmt == "fp8":
            r = (q / (h.abs().amax(-1, keepdim=True) / 448)).flatten().double()
            gap = (r[:, None] - codebook(8).double()[None, :]).abs().min(1).values
            assert bool((gap <= 1e-5 * r.abs().clamp_min(1)).all())
        else:
            scale = h.abs().amax(-1, keepdim=True) / 127
            torch.testing.assert_close(q / scale, torch.round(q / scale), rtol=0, atol=1e-4)
    act.remove()
    assert "forward" not in vars(experts) and "act_quant" not in vars(experts)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref)


def test_expert_statistics_read_the_rounded_down_proj_inputs():
    from compress_order.modeling.moe import expert_units

    model = _model("Mixtral")
    targets = find_targets(model, ["lm_head"])
    ActQuant(8, "token").install(targets)
    (unit, *_) = expert_units(list(targets.values()))

    class Rows:
        def __init__(self, t):
            self.rows = []

        def add_batch(self, x):
            self.rows.append(x)

    stats, handle = unit.collect(list(unit.by_param), Rows, all_experts=False)
    with torch.no_grad():
        model(_ids())
    handle.remove()
    down = [t for t in unit.by_param["down_proj"].values() if stats[id(t)].rows]
    assert down
    for t in down:
        for x in stats[id(t)].rows:  # on the per-token int8 grid: what the module's own call fed down_proj
            scale = x.abs().amax(-1, keepdim=True) / 127
            torch.testing.assert_close(x / scale, torch.round(x / scale), rtol=0, atol=1e-4)


def test_an_moe_run_with_activation_quantization_runs_and_static_is_refused(tiny_overrides, tmp_path, capsys):
    from helpers import save_tiny_moe

    ckpt = save_tiny_moe("Mixtral", tmp_path / "mixtral")
    over = [o for o in tiny_overrides if not o.startswith(("model.path", "model.name"))]
    over += [f"model.path={ckpt}", "model.name=tiny-mixtral", "model.dtype=float32", "eval.backends=none",
             "stages=[gptq]", "bits=8", "group_size=32", "eval.max_windows=2", "calibration.seqlen=32"]  # fmt: skip
    from compress_order.config.compose import compose_config
    from helpers import run

    df = run(compose_config([*over, "act_format=fp8"]), tmp_path / "out")
    ok = df[(df.status == "ok") & (df.metric == "perplexity")]
    assert set(ok["order"]) == {"dense", "gptq"} and set(ok["act_format"]) == {"fp8"}
    assert exit_code(["run", *over, "act_bits=8", "act_granularity=static"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "act_granularity=static: the inputs of fused MoE experts (MixtralExperts) take dynamic scales only" in err[-1]
