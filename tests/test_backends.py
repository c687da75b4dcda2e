"""Packed size arithmetic on hand-computed cases; packed CPU kernels hold the node's own codes and compute the
evaluated model (logits within kernel tolerance, perplexity within 0.5%), timed against the dense node in the
kernel's activation dtype."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import settings

from compress_order.evaluation.backends import BACKENDS, dtype_name, select_backends
from compress_order.numerics.constraints import LayerConstraint
from compress_order.core.errors import UserError
from compress_order.evaluation.measure import compression_metrics, layer_bits
from compress_order.numerics.prune import select_mask
from compress_order.numerics.quant import fit_grid
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.rtn import RTN
from compress_order.modeling.targets import Target, find_targets


def _target(rows=64, cols=128, **constraint) -> Target:
    t = Target("x", nn.Linear(cols, rows, bias=False))
    t.constraint = LayerConstraint(**constraint)
    return t


def test_packed_bits_hand_computed():
    numel = 64 * 128
    assert layer_bits(_target()) == (numel * 16, "dense")
    w = torch.randn(64, 128)
    asym = _target(grid=fit_grid(w, 4, 32, sym=False))  # 4 bits + (16-bit scale + 4-bit zero) per 32
    assert layer_bits(asym) == (numel * 4 + 64 * 4 * 20, "dense")
    sym = _target(grid=fit_grid(w, 4, 32, sym=True))  # symmetric: the zero-point is implied
    assert layer_bits(sym)[0] == numel * 4 + 64 * 4 * 16
    half = select_mask(w.abs(), 0.5)
    pruned = _target(mask=half, min_sparsity=0.5)  # 16-bit kept values + 1-bit-per-weight bitmask
    assert layer_bits(pruned) == (numel // 2 * 16 + numel, "bitmask")
    both = _target(mask=half, min_sparsity=0.5, grid=fit_grid(w, 4, 32, False))
    assert layer_bits(both) == (numel // 2 * 4 + numel + 64 * 4 * 20, "bitmask")
    nm = select_mask(w.abs(), 0.5, nm=(2, 4))
    assert layer_bits(_target(mask=nm, nm=(2, 4), grid=fit_grid(w, 4, 32, False))) == (
        numel // 2 * (4 + 2) + 64 * 4 * 20, "2:4")  # fmt: skip
    light = select_mask(w.abs(), 0.03)  # a bitmask costs more than it saves: stored dense
    assert layer_bits(_target(mask=light, grid=fit_grid(w, 2, 128, True)))[1] == "dense"


def test_equal_budget_comparison_counts_everything():
    """50% sparse + 4-bit and 3-bit dense are compared on the same packed-bits scale."""
    torch.manual_seed(0)
    a, b = nn.Linear(256, 128), nn.Linear(256, 128)
    b.load_state_dict(a.state_dict())
    ta, tb = find_targets(a), find_targets(b)
    for t in ta.values():
        Magnitude(0.5, name="m").compress(t)
        RTN(4, 128, False, name="r").compress(t)
    for t in tb.values():
        RTN(3, 128, False, name="r").compress(t)
    ma, mb = compression_metrics(a, ta), compression_metrics(b, tb)
    assert ma["avg_bits"] == pytest.approx(0.5 * 4 + 1 + 20 / 128)
    assert mb["avg_bits"] == pytest.approx(3 + 19 / 128)
    assert ma["size_bytes"] == pytest.approx((ma["avg_bits"] * 256 * 128 + 128 * 16) / 8)  # bias stays 16-bit


@pytest.mark.parametrize("name,bits,act,tol", [("int8_weight_only", 8, torch.float32, 1e-5),
                                               ("int4_weight_only", 4, torch.bfloat16, 0.02)])  # fmt: skip
def test_packed_cpu_forward_matches_fake_quant(name, bits, act, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    targets = find_targets(model)
    for t in targets.values():
        RTN(bits, 32, False, name="r").compress(t)
    backend = BACKENDS[name]
    assert backend.fits(targets) is None
    assert backend.label(torch.float32, torch.device("cpu")) == f"{name}({dtype_name(act)})"
    packed = backend.convert(model, targets, torch.device("cpu"))
    x = torch.randn(16, 128)
    with torch.no_grad():
        ref, out = model(x), packed(x.to(act)).float()
    assert type(packed[0].weight).__name__ != "Parameter"
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def test_backends_that_cannot_serve_a_node_say_why():
    model = nn.Sequential(nn.Linear(128, 64))
    targets = find_targets(model)
    assert BACKENDS["int8_weight_only"].fits(targets) == "weights are not quantized"
    for t in targets.values():
        RTN(6, 32, False, name="r").compress(t)
    assert "6-bit weights" in BACKENDS["int4_weight_only"].fits(targets)
    assert BACKENDS["sparse_2_4"].fits(targets) == "weights are not 2:4 sparse"
    t = targets["0"]
    for grid, name, why in [
        (fit_grid(t.weight, 4, 16, sym=False), "int4_weight_only",
         "0: group size 16: the int4 kernel takes groups of 32, 64, 128, 256 (or a multiple)"),
        (fit_grid(t.weight[:, :120], 4, -1, sym=True), "int4_weight_only",
         "0: per-channel grid over 120: the int4 kernel takes groups of 32, 64, 128, 256 (or a multiple)"),
        (fit_grid(t.weight, 8, -1, sym=False), "int8_weight_only",
         "0: an 8-bit per-channel grid with zero-points other than 128 spans more than int8, and the int8 "
         "per-channel kernel takes no zero-point"),
    ]:  # fmt: skip
        if grid.group_size != t.shape[1] and grid.n_groups == 1:  # a per-channel grid over another width
            model2 = nn.Sequential(nn.Linear(120, 64))
            targets = find_targets(model2)
        else:
            targets = find_targets(model)
        targets["0"].constraint = LayerConstraint(grid=grid)
        assert BACKENDS[name].fits(targets) == why
    for bits, gs, sym in [(8, -1, True), (8, 32, False), (7, -1, False)]:  # every other 8-bit-or-less grid fits
        targets["0"].constraint = LayerConstraint(grid=fit_grid(t.weight, bits, gs, sym))
        assert BACKENDS["int8_weight_only"].fits(targets) is None


# ---------------------------------------------------------- the packed copy computes the evaluated model


@pytest.fixture(scope="module")
def charllama():
    """The embedded char-LLaMA with its evaluation task (8 windows of 256 tokens), and its dense weights."""
    from compress_order.config.compose import compose_config
    from compress_order.core.instantiate import build
    from compress_order.modeling.targets import ModelState
    from compress_order.evaluation.tasks.lm import LMTask

    cfg = compose_config(["device=cpu", "eval.max_windows=8"])
    lm = build(cfg.model)
    task = LMTask(lm, build(cfg.data), settings(cfg))
    targets = find_targets(lm.model, lm.skip)
    state = ModelState(lm.model, targets)
    return lm.model, targets, task, state, state.snapshot()


# (backend, bits, group size, symmetric, logits tolerance): float32 kernels differ from the evaluated model only in
# the order of float32 sums; bf16 rounds every activation (unit roundoff 2^-8) over six layers.
FAITHFUL = [
    ("int8_weight_only", 8, -1, True, 1e-5),  # per channel: x @ int8ᵀ · scale
    ("int8_weight_only", 4, 128, False, 1e-5),  # codes − zero in int8, per group
    ("int8_weight_only", 8, 32, False, 1e-5),  # 8-bit with zero-points: codes − 128, zero-points − 128
    ("int4_weight_only", 4, 128, False, 0.02),
    ("int4_weight_only", 3, 32, True, 0.02),  # 3-bit codes in 4-bit slots
    ("int4_weight_only", 2, -1, False, 0.02),  # per channel: one scale repeated over kernel groups of 128 / 256
]


@pytest.mark.parametrize("name,bits,group_size,sym,tol", FAITHFUL)
def test_packed_model_computes_the_evaluated_model(charllama, name, bits, group_size, sym, tol):
    from compress_order.evaluation.backends import own_codes

    model, targets, task, state, dense = charllama
    state.restore(dense)
    for t in targets.values():
        RTN(bits, group_size, sym, name="r").compress(t)
    backend = BACKENDS[name]
    assert backend.fits(targets) is None
    packed = backend.convert(model, targets, torch.device("cpu"))
    if name == "int8_weight_only":  # the node's own codes, scales and zero-points: its exact weights come back
        for n, t in targets.items():
            w = packed.get_submodule(n).weight
            codes, grid = own_codes(t)
            zero = grid.zero.repeat_interleave(grid.group_size, 1).int()
            assert torch.equal(w.qdata.int(), codes - zero if w.zero_point is None else codes - 128)
            assert torch.equal(w.dequantize(), t.weight)
    x = task.windows[:2]
    with torch.no_grad():
        ref, out = model(input_ids=x).logits, packed(input_ids=x).logits.float()
    err = float((out - ref).norm() / ref.norm())
    assert err <= tol, err
    ppl, ppl_packed = task.evaluate(model)[0]["perplexity"], task.evaluate(packed)[0]["perplexity"]
    assert abs(ppl_packed / ppl - 1) <= 0.005, (ppl_packed, ppl)


class _Timer:
    """A task whose latency records the dtype of the model it timed."""

    def __init__(self) -> None:
        self.timed: list[torch.dtype] = []

    def latency(self, model: nn.Module) -> dict[str, float]:
        self.timed.append(next(model.parameters()).dtype)
        return {"latency_ms": float(len(self.timed))}


def test_each_backend_is_labelled_and_compared_in_its_activation_dtype():
    from compress_order.evaluation.backends import latency_entries
    from compress_order.run.summary import summary_markdown

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    targets = find_targets(model)
    for t in targets.values():
        RTN(4, 32, False, name="r").compress(t)
    timer = _Timer()
    entries = latency_entries(select_backends("auto", torch.device("cpu")), model, targets, timer, torch.device("cpu"))
    assert [(e["backend"], e["value"]) for e in entries] == [
        ("int8_weight_only(fp32)", 1.0), ("int4_weight_only(bf16)", 2.0), ("dense(bf16)", 3.0)]  # fmt: skip
    assert timer.timed == [torch.float32, torch.bfloat16, torch.bfloat16]  # the reference: the node cast to bf16
    assert next(model.parameters()).dtype == torch.float32  # the evaluated model is untouched

    rows = [{"backend": "dense-simulated", "metric": "latency_ms", "value": 6.0},
            {"backend": "dense-simulated", "metric": "perplexity", "value": 5.0}] + entries  # fmt: skip
    df = pd.DataFrame([{"model": "m", "dataset": "d", "stages": "rtn", "seed": 0, "depth": 1, "order": "rtn",
                        "status": "ok", **r} for r in rows])  # fmt: skip
    table = summary_markdown(df, "perplexity", "")
    header, _, values = table.strip().splitlines()[-3:]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in values.split("|")]))
    assert cells["int8_weight_only(fp32) speed-up"] == "6.00×"  # vs the evaluated (fp32) model
    assert cells["int4_weight_only(bf16) speed-up"] == "1.50×"  # vs the node cast to bf16, not the fp32 forward
    assert "dense(bf16) speed-up" not in cells and cells["dense(bf16) ms"] == "3"


@pytest.mark.parametrize("fmt,group", [("fp8", -1), ("nvfp4", 16), ("mxfp4", 32)])
def test_float_grids_get_na_rows_that_say_why_no_kernel_times_them(fmt, group):
    """No backend times a float grid: each gives an n/a row naming the float kernels that exist and why none of
    them computes what was evaluated; nothing is timed."""
    from compress_order.evaluation.backends import FLOAT_KERNELS, latency_entries

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    targets = find_targets(model)
    for t in targets.values():
        RTN(8 if fmt == "fp8" else 4, group, True, name="r", format=fmt).compress(t)
    timer = _Timer()
    entries = latency_entries(select_backends("auto", torch.device("cpu")), model, targets, timer, torch.device("cpu"))
    assert [e["backend"] for e in entries] == ["int8_weight_only(fp32)", "int4_weight_only(bf16)"]
    assert timer.timed == [] and all(e["status"] == "n/a" and e["value"] != e["value"] for e in entries)
    assert all(e["error"] == f"these kernels take integer grids; {fmt} weights have no kernel in this backend "
                             f"({FLOAT_KERNELS[fmt]})" for e in entries)  # fmt: skip


def test_backend_selection_on_cpu():
    cpu = torch.device("cpu")
    assert [b.name for b in select_backends("auto", cpu)] == ["int8_weight_only", "int4_weight_only"]
    assert select_backends("none", cpu) == []
    with pytest.raises(UserError, match="cannot run on cpu; supported on cpu: int4_weight_only, int8_weight_only"):
        select_backends(["sparse_2_4"], cpu)
    with pytest.raises(UserError, match="unknown backend 'fast'"):
        select_backends(["fast"], cpu)


def test_requesting_a_gpu_backend_on_cpu_exits_2(tiny_overrides, capsys):
    from compress_order.cli.main import main

    assert main(["run", *tiny_overrides, "eval.backends=[sparse_2_4]", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backend 'sparse_2_4' cannot run on cpu" in err[0]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")


@needs_cuda
def test_cuda_int4_matches_fake_quant():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).to(dev).eval()
    targets = find_targets(model)
    for t in targets.values():
        RTN(4, 64, False, name="r").compress(t)
    packed = BACKENDS["int4_weight_only"].convert(model, targets, dev)
    x = torch.randn(8, 256, device=dev)
    with torch.no_grad():
        ref, out = model(x), packed(x.to(torch.bfloat16)).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@needs_cuda
def test_cuda_semi_structured_2_4_matches_masked_dense():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).to(dev).eval()
    targets = find_targets(model)
    for t in targets.values():
        Magnitude(0.5, nm="2:4", name="m").compress(t)
    assert BACKENDS["sparse_2_4"].fits(targets) is None
    packed = BACKENDS["sparse_2_4"].convert(model, targets, dev)
    x = torch.randn(64, 256, device=dev)
    with torch.no_grad():
        ref, out = model(x), packed(x.half()).float()
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
