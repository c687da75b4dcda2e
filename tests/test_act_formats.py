"""Floating-point activations (`act_format`, compress_order/modeling/act.py): FP8 E4M3 per token / tensor / static and NVFP4
in groups of 16, checked against hand computations from the formats' definitions, codebook membership on a model,
whole runs, the rules pairing them with weight formats, and the refusals."""

from __future__ import annotations

import pytest
import torch

from compress_order.modeling.act import ActQuant, fake_quant
from compress_order.core.errors import UserError
from compress_order.numerics.formats import codebook, e4m3
from compress_order.modeling.targets import find_targets
from helpers import exit_code, settings, tiny_llama_model, token_batches


def test_fp8_per_token_scale_is_amax_over_448_and_rounds_to_e4m3_by_hand():
    x = torch.tensor([[1.0, -3.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0], [448.0, 1.0, -0.5, 2.0**-11]])
    q = fake_quant(x, 8, "token", fmt="fp8")
    # row 0: s = 3/448; 1/s = 149.33 lies between the E4M3 values 144 and 160 (step 16 in [128, 256)) → 144;
    # 0.1/s = 14.93 → 15 (step 1 in [8, 16)); -3/s = -448 exactly
    assert q[0].tolist() == pytest.approx([144 * 3 / 448, -3.0, 15 * 3 / 448, 0.0], rel=1e-6)
    assert q[1].tolist() == [0.0] * 4  # an all-zero token stays zero
    # row 2: s = 1; 2^-11 is below half the smallest subnormal 2^-9 → 0
    assert q[2].tolist() == [448.0, 1.0, -0.5, 0.0]


def test_fp8_per_tensor_and_static_scales_by_hand():
    x = torch.tensor([[1.0, -3.0], [0.1, 0.5]])
    q = fake_quant(x, 8, "tensor", fmt="fp8")  # one scale s = 3/448 for both rows
    # 0.1/s = 14.93 → 15; 0.5/s = 74.67 → 72 (step 8 in [64, 128))
    assert q[1].tolist() == pytest.approx([15 * 3 / 448, 72 * 3 / 448], rel=1e-6)
    # static: the observed range 1.0 fixes s = 1/448; 3/s = 1344 saturates at 448 (q = 1.0); 0.1/s = 44.8 → 44
    q = fake_quant(x, 8, "static", amax=torch.tensor(1.0), fmt="fp8")
    assert q.flatten().tolist() == pytest.approx([1.0, -1.0, 44 / 448, 0.5], rel=1e-6)  # 0.5/s = 224 exactly


def test_nvfp4_groups_of_16_with_e4m3_scales_and_a_tensor_scale_by_hand():
    g0 = [0.5, 1, 1.5, 2, 3, 4, 6, 12, 0, 0, 0, 0, 0, 0, 0, -2.9]
    g1 = [1.3, 0.2, -0.7] + [0.0] * 13
    x = torch.tensor([g0 + g1])
    q = fake_quant(x, 4, "group", fmt="nvfp4")[0]
    # tensor scale t = 12 / (6 · 448). Group 0: (12/6)/t = 448 → E4M3 448 → scale 448 / fl32(1/t), applied as a
    # checkpoint stores it (the E4M3 value over the float32 global scale 1/t): 2 plus one float32 ulp, so x/scale
    # sits just below the E2M1 midpoints: 0.5 → 0.2499… → 0, 1.5 → 0.7499… → 0.5 (not the tie's 1), -2.9 → -1.5
    scale = 448 / float(torch.tensor(1.0) / torch.tensor(12 / 2688, dtype=torch.float32))
    assert scale > 2
    want = [0, 0.5, 0.5, 1, 1.5, 2, 3, 6, 0, 0, 0, 0, 0, 0, 0, -1.5]
    assert q[:16].tolist() == pytest.approx([c * scale for c in want], rel=1e-6, abs=1e-6)
    # Group 1: (1.3/6)/t = 48.53, stored in E4M3 as 48 (step 4 in [32, 64)) → scale 48 t = 3/14; 1.3/scale = 6.07
    # saturates at 6, 0.2/scale = 0.93 → 1, -0.7/scale = -3.27 → -3
    s = 48 * 12 / 2688
    assert q[16:19].tolist() == pytest.approx([6 * s, s, -3 * s], rel=1e-6)
    assert q[19:].tolist() == [0.0] * 13


def test_nvfp4_groups_run_along_the_channel_dim_of_a_convolution_input():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 3, 3)  # (batch, channels, h, w): groups of 16 channels at each pixel
    q = fake_quant(x, 4, "group", channel_dim=1, fmt="nvfp4")
    ref = fake_quant(x.movedim(1, -1).reshape(-1, 32), 4, "group", fmt="nvfp4")
    assert torch.equal(q.movedim(1, -1).reshape(-1, 32), ref)


def _captured(fmt: str, granularity: str):
    """A tiny LLaMA with `fmt` activations; every target's full-precision and quantized inputs on one batch."""
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    act = ActQuant({"fp8": 8, "nvfp4": 4}[fmt], granularity, fmt).install(targets)
    seen: dict[str, list] = {n: [] for n in targets}
    for n, t in targets.items():  # prepended after install: runs before the quantizer; appended: after it
        t.module.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()), prepend=True)
        t.module.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
    with torch.no_grad():
        model(token_batches(1)[0])
    act.remove()
    return seen


def _on_book(r: torch.Tensor, bits: int) -> bool:
    gap = (r.double().flatten()[:, None] - codebook(bits).double()[None, :]).abs().min(1).values
    return bool((gap <= 1e-5 * r.double().flatten().abs().clamp_min(1)).all())


def test_fp8_inputs_of_every_layer_lie_on_e4m3_times_their_token_scale():
    for name, (x, q) in _captured("fp8", "token").items():
        scale = x.float().abs().amax(-1, keepdim=True) / 448
        assert _on_book(q / scale, 8), name
        assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)  # each token's max maps to ±448
        assert not torch.equal(q, x)


def test_nvfp4_inputs_of_every_layer_lie_on_e2m1_times_e4m3_group_scales():
    for name, (x, q) in _captured("nvfp4", "group").items():
        t = x.abs().amax() / (6 * 448)
        groups = x.reshape(*x.shape[:-1], -1, 16)
        stored = e4m3(groups.abs().amax(-1, keepdim=True) / 6 / t)
        assert _on_book(q.reshape(groups.shape) / (stored * t), 4), name
        rel = float((q - x).norm() / x.norm())
        assert 0.03 < rel < 0.2, (name, rel)  # 4-bit rounding: a visible, bounded error


def test_nvfp4_activations_refuse_layers_whose_channels_are_not_groups_of_16():
    lin = torch.nn.Sequential(torch.nn.Linear(20, 8))
    with pytest.raises(UserError, match="the 20 input channels of 0 are not a multiple of it"):
        ActQuant(4, "group", "nvfp4").install(find_targets(lin))


def test_fp8_static_ranges_are_observed_and_used():
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    act = ActQuant(8, "static", "fp8").install(targets)
    act.observe(model, token_batches(2))
    assert len(act.ranges) == len(targets) and all(float(r) > 0 for r in act.ranges.values())
    with torch.no_grad():
        out = model(token_batches(1)[0]).logits
    act.remove()
    with torch.no_grad():
        ref = model(token_batches(1)[0]).logits
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.1


# --- whole runs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wfmt,afmt,bits", [("fp8", "fp8", 8), ("nvfp4", "nvfp4", 4), ("int", "fp8", 8)],
                         ids=["W8A8-FP8", "W4A4-NVFP4", "W4A8-INT4-FP8"])  # fmt: skip
def test_a_float_activation_run_records_its_format_end_to_end(wfmt, afmt, bits, tiny_overrides, tmp_path):
    from compress_order.config.compose import compose_config
    from helpers import run

    over = [*tiny_overrides, f"format={wfmt}", f"act_format={afmt}", "stages=[magnitude,rtn]", "sparsity=0.5",
            "eval.backends=none"] + (["bits=4", "group_size=32"] if wfmt == "int" else [])  # fmt: skip
    df = run(compose_config(over), tmp_path / "out")
    ok = df[df.status == "ok"]
    assert set(ok["act_format"]) == {afmt} and set(ok["act_bits"]) == {bits} and set(ok["format"]) == {wfmt}
    ppl = ok[(ok.metric == "perplexity") & (ok.backend == "dense-simulated")].set_index("order")["value"]
    plain = run(compose_config([o for o in over if not o.startswith("act_format")]), tmp_path / "plain")
    ref = plain[(plain.metric == "perplexity") & (plain.backend == "dense-simulated")].set_index("order")["value"]
    assert set(ppl.index) == {"dense", "magnitude", "rtn", "magnitude > rtn", "rtn > magnitude"}
    assert (ppl != ref.reindex(ppl.index)).all()  # every node, the dense one included, sees rounded activations
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"fake-quantized to {afmt} ({bits}-bit, act_format)" in summary


def test_act_format_keys_nodes_and_leaves_integer_identities_as_they_were():
    from compress_order.config.compose import compose_config
    from compress_order.run.identity import base_identity

    def ident(*over):
        cfg = compose_config(["device=cpu", *over])
        return base_identity(settings(cfg)).get("act")

    assert ident() is None
    assert ident("act_bits=8") == {"bits": 8, "granularity": "token"}
    assert ident("act_format=fp8") == {"bits": 8, "granularity": "token", "format": "fp8"}
    assert ident("format=nvfp4", "act_format=nvfp4") == {"bits": 4, "granularity": "group", "format": "nvfp4"}


def test_tables_read_old_rows_as_integer_activations_and_leave_the_column_out():
    import pandas as pd

    from compress_order.analysis.tables import IMPLIED

    old = pd.DataFrame({"act_bits": [None, 8.0], "act_format": [None, None]})
    filled = old["act_format"].where(old["act_format"].notna() | old["act_bits"].isna(), "int")
    assert filled.tolist()[1] == "int" and pd.isna(filled.tolist()[0])
    assert (filled.dropna() == IMPLIED["act_format"]).all()


# --- bad input ---------------------------------------------------------------------------------------------------

BAD = [
    (["act_format=fp4"], "act_format=fp4 is unknown; valid: null, fp8, nvfp4"),
    (["act_format=nvfp4", "format=nvfp4", "act_bits=8"], "act_format=nvfp4 quantizes activations to 4 bits; act_bits=8"),
    (["act_format=fp8", "act_bits=4"], "act_format=fp8 quantizes activations to 8 bits; act_bits=4 contradicts it"),
    (["act_format=nvfp4"], "act_format=nvfp4 activations do not pair with format=int weights; valid: format=nvfp4, "
                           "or act_format=fp8"),
    (["act_format=nvfp4", "format=mxfp4"], "do not pair with format=mxfp4 weights; valid: format=nvfp4, or act_format=fp8"),
    (["act_bits=8", "format=fp8"], "integer act_bits=8 activations do not pair with format=fp8 weights; valid: "
                                   "format=int, or act_format=fp8"),
    (["act_format=nvfp4", "format=nvfp4", "act_granularity=token"],
     "act_granularity=token does not apply to act_format=nvfp4; valid: group"),
    (["act_format=fp8", "act_granularity=group"], "act_granularity=group does not apply to act_format=fp8; valid: "
                                                  "token, tensor, static"),
    (["act_granularity=group"], "act_granularity=group does not apply to integer activations"),  # with act_bits off
    (["act_format=nvfp4", "format=nvfp4", "save=true"], "an act_format=nvfp4 run is not saved: an NVFP4 checkpoint's "
                                                          "activations need a calibrated global input scale"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_activation_formats_exit_2_with_one_line(args, message, tiny_overrides, tmp_path, capsys):
    assert exit_code(["run", *tiny_overrides, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "results.parquet").exists()


def test_export_of_an_act_format_run_is_refused_before_any_model_work(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("act_format: nvfp4\nstages: [rtn]\n")
    assert exit_code(["export", str(tmp_path), "--order", "rtn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an act_format=nvfp4 run is not saved" in err[0], err
