"""Every quantizer that takes a `format` rounds onto that format's codebook, and every ordered pair with a pruner
keeps both constraints: pruned weights stay zero and every weight stays exactly on its (float) grid."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress_order.stages.calibration import calibrate_and_compress
from compress_order.numerics.formats import FloatGrid, codebook
from compress_order.stages.awq import AWQ
from compress_order.stages.gptq import GPTQ
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.mixed import MixedRTN
from compress_order.stages.rtn import RTN
from compress_order.stages.sparsegpt import SparseGPT
from compress_order.stages.sparsegpt_gptq import SparseGPTGPTQ
from compress_order.stages.wanda import Wanda
from compress_order.modeling.targets import ModelState, find_targets
from helpers import exit_code, tiny_llama_model, token_batches

FORMATS = {"fp8": (8, -1), "nvfp4": (4, 16), "mxfp4": (4, 32)}
PRUNERS = {"magnitude": lambda nm: Magnitude(0.5, nm=nm, name="magnitude"),
           "wanda": lambda nm: Wanda(0.5, nm=nm, name="wanda"),
           "sparsegpt": lambda nm: SparseGPT(0.5, nm=nm, name="sparsegpt")}  # fmt: skip
QUANTIZERS = {"rtn": lambda f, b, g: RTN(b, group_size=g, format=f, name="rtn"),
              "gptq": lambda f, b, g: GPTQ(b, group_size=g, format=f, name="gptq"),
              "awq": lambda f, b, g: AWQ(b, group_size=g, format=f, n_grid=5, name="awq")}  # fmt: skip


def _apply(stage, model, targets, batches) -> None:
    if stage.needs is None:
        for t in targets.values():
            stage.compress(t, None)
    else:
        calibrate_and_compress(model, targets, batches, stage)
    ModelState(model, targets).check()  # masks, sparsity, N:M, exact codebook membership, scale formats


def _on_codebook(t) -> bool:
    """Every weight ÷ its scale is a codebook value (up to the division's rounding), read independently of the
    grid's own projection."""
    g = t.constraint.grid
    r = (t.weight.double() / g.scale.double().repeat_interleave(g.group_size, 1)).flatten()
    gap = (r[:, None] - codebook(g.bits).double()[None, :]).abs().min(1).values
    return bool((gap <= 1e-6 * r.abs().clamp_min(1)).all())


CASES = [(f, a, b, nm) for f in FORMATS for p, q in itertools.product(PRUNERS, QUANTIZERS)
         for a, b in ((p, q), (q, p)) for nm in (None, "2:4")]  # fmt: skip


@pytest.mark.parametrize("fmt,first,second,nm", CASES, ids=[f"{f}-{a}>{b}-{nm}" for f, a, b, nm in CASES])
def test_every_ordered_pair_keeps_its_constraints_on_a_float_grid(fmt, first, second, nm):
    bits, group = FORMATS[fmt]
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    batches = token_batches()
    for name in (first, second):
        stage = PRUNERS[name](nm) if name in PRUNERS else QUANTIZERS[name](fmt, bits, group)
        _apply(stage, model, targets, batches)
    for t in targets.values():
        c = t.constraint
        assert isinstance(c.grid, FloatGrid) and c.grid.fmt == fmt and _on_codebook(t), t.name
        assert float((t.weight == 0).float().mean()) >= 0.5 - 1e-9
        assert bool((t.weight[~c.mask] == 0).all())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_joint_schedule_prunes_and_rounds_onto_a_float_grid(fmt):
    bits, group = FORMATS[fmt]
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    _apply(SparseGPTGPTQ(0.5, bits, group_size=group, format=fmt, name="j"), model, targets, token_batches())
    assert all(isinstance(t.constraint.grid, FloatGrid) and _on_codebook(t) for t in targets.values())


def test_gptq_beats_rtn_on_the_layer_output_error_on_each_format():
    """GPTQ's error feedback onto the codebook lowers the calibration-weighted error ‖(W - Q) X‖ against RTN."""
    from compress_order.modeling.hessian import HessianStats

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(512, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs: where feedback helps
    lin = torch.nn.Linear(128, 64, bias=False)
    for fmt, (bits, group) in FORMATS.items():
        errs = {}
        for name, make in QUANTIZERS.items():
            lin.weight.data.copy_(w)
            (t,) = find_targets(lin).values()
            stats = HessianStats(lin)
            stats.add_batch(x)
            make(fmt, bits, group).compress(t, stats)
            errs[name] = float(((t.weight - w) @ x.t()).norm())
        assert errs["gptq"] < errs["rtn"], (fmt, errs)


def test_awq_on_a_float_format_lowers_the_output_error_against_rtn_on_the_same_grid():
    """AWQ's clip search on the format's grid (α = 0 and no shrink is RTN) lowers tr(ΔW H ΔWᵀ) on each format."""
    from compress_order.modeling.hessian import HessianStats
    from compress_order.stages.awq import output_error

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(512, 128) * torch.rand(128) * 3  # channels of very different magnitude
    lin = torch.nn.Linear(128, 64, bias=False)
    for fmt, (bits, group) in FORMATS.items():
        errs = {}
        for name in ("rtn", "awq"):
            lin.weight.data.copy_(w)
            (t,) = find_targets(lin).values()
            stats = HessianStats(lin)
            stats.add_batch(x)
            QUANTIZERS[name](fmt, bits, group).compress(t, stats)
            assert isinstance(t.constraint.grid, FloatGrid) and t.constraint.grid.problem() is None and _on_codebook(t)
            errs[name] = output_error(t.weight - w, stats.H)
        assert errs["awq"] < errs["rtn"], (fmt, errs)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_a_producer_with_stored_scales_absorbs_powers_of_two_only(fmt):
    from compress_order.modeling.scaling import Partner
    from compress_order.stages.awq import _absorbs

    lin = torch.nn.Linear(64, 32, bias=False)
    (t,) = find_targets(lin).values()
    RTN(4, group_size=FORMATS[fmt][1], format=fmt, name="rtn").compress(t)
    p = Partner("v", lin, t)
    assert _absorbs(p, torch.exp2(torch.randint(-3, 4, (32,)).float()))
    assert not _absorbs(p, torch.full((32,), 1.3))
    p.divide(torch.exp2(torch.randint(-3, 4, (32,)).float()))  # the weights move with their scales, on the grid
    assert t.constraint.grid.problem() is None and _on_codebook(t)


def test_rtn_mixed_rounds_each_layer_onto_the_format_its_map_names():
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    stage = MixedRTN(3, bits_map={"down_proj": "fp8", "q_proj": "nvfp4", "k_proj": "mxfp4", "v_proj": 8},
                     group_size=32, name="rtn_mixed")  # fmt: skip
    stage.validate(targets)
    _apply(stage, model, targets, token_batches())
    kinds = {n.rsplit(".", 1)[-1]: (t.constraint.grid.fmt, t.constraint.grid.bits, t.constraint.grid.group_size)
             for n, t in targets.items()}  # fmt: skip
    assert kinds == {"q_proj": ("nvfp4", 4, 16), "k_proj": ("mxfp4", 4, 32), "v_proj": ("int", 8, 32),
                     "o_proj": ("int", 3, 32), "gate_proj": ("int", 3, 32), "up_proj": ("int", 3, 32),
                     "down_proj": ("fp8", 8, 128)}  # fmt: skip (fp8 per channel: one group of all 128 inputs)
    assert all(_on_codebook(t) for t in targets.values() if isinstance(t.constraint.grid, FloatGrid))


def test_a_quantizer_without_a_format_is_refused_on_a_float_format():
    from compress_order.core.errors import UserError
    from compress_order.config.stages import _check_format

    sc = {"_target_": "compress_order.stages.rtn.RTN", "label": "legacy"}  # a stage config with no `format`
    with pytest.raises(UserError, match="stage 'legacy' rounds onto integer grids only; format=mxfp4"):
        _check_format(sc, "mxfp4")
    _check_format({**sc, "_target_": "compress_order.stages.smoothquant.SmoothQuant"}, "mxfp4")  # a transform


BAD = [
    (["format=bf4"], "format=bf4 is unknown; valid: int, fp8, nvfp4, mxfp4"),
    (["stages=[magnitude]", "format=bf4"], "format=bf4 is unknown"),  # checked whatever the stages
    (["format=nvfp4", "bits=3"], "format=nvfp4 stores 4-bit elements; bits=3 contradicts it"),
    (["format=mxfp4", "group_size=16"], "format=mxfp4 takes group_size 32; group_size=16 contradicts it"),
    (["format=fp8", "group_size=64"], "format=fp8 takes group_size -1 or 128"),
    (["format=nvfp4", "stages=[awq,{name:rtn_mixed,budget:3}]"],
     "rtn_mixed budget=3 allocates integer widths; format=nvfp4 is max-scaled at its own width"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_format_settings_exit_2_with_one_line(args, message, tiny_overrides, tmp_path, capsys):
    keys = {a.split("=", 1)[0] for a in args}
    base = [o for o in tiny_overrides if o.split("=", 1)[0] not in keys]
    assert exit_code(["run", *base, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "results.parquet").exists()


def test_a_float_format_run_follows_the_format_and_counts_its_scales(tiny_overrides, tmp_path):
    from compress_order.config.compose import compose_config
    from helpers import run

    df = run(compose_config([*tiny_overrides, "format=nvfp4", "stages=[sparsegpt,gptq]", "sparsity=0.5",
                             "eval.backends=[int4_weight_only]", "calibration.nsamples=2"]), tmp_path / "out")  # fmt: skip
    assert set(df["bits"]) == {4} and set(df["group_size"]) == {16}
    sim = df[df.backend == "dense-simulated"]
    bits = sim[sim.metric == "avg_bits"].set_index("order")["value"]
    # 4-bit codes + an 8-bit E4M3 scale per 16 weights + one float32 scale per layer
    assert bits["gptq"] == pytest.approx(4 + 8 / 16, abs=0.01) and bits["gptq"] > 4.5
    na = df[(df.backend != "dense-simulated") & (df.order == "gptq")]
    assert len(na) and (na["status"] == "n/a").all() and na["error"].str.contains("nvfp4 weights have no kernel").all()
