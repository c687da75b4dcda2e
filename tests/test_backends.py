"""Packed size arithmetic on hand-computed cases; packed CPU kernels match the fake-quantized model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_order.backends import BACKENDS, select_backends
from compress_order.constraints import LayerConstraint
from compress_order.errors import UserError
from compress_order.measure import compression_metrics, layer_bits
from compress_order.prune import select_mask
from compress_order.quant import fit_grid
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.rtn import RTN
from compress_order.targets import Target, find_targets


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


@pytest.mark.parametrize("name,bits,tol", [("int8_weight_only", 8, 0.02), ("int4_weight_only", 4, 0.02)])
def test_packed_cpu_forward_matches_fake_quant(name, bits, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    targets = find_targets(model)
    for t in targets.values():
        RTN(bits, 32, False, name="r").compress(t)
    backend = BACKENDS[name]
    assert backend.fits(targets) is None
    packed = backend.convert(model, targets, torch.device("cpu"))
    x = torch.randn(16, 128)
    with torch.no_grad():
        ref, out = model(x), packed(x)
    assert type(packed[0].weight).__name__ != "Parameter" or name == "none"
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def test_backends_that_cannot_serve_a_node_say_why():
    model = nn.Sequential(nn.Linear(128, 64))
    targets = find_targets(model)
    assert BACKENDS["int8_weight_only"].fits(targets) == "weights are not quantized"
    for t in targets.values():
        RTN(6, 32, False, name="r").compress(t)
    assert "6-bit weights" in BACKENDS["int4_weight_only"].fits(targets)
    assert BACKENDS["sparse_2_4"].fits(targets) == "weights are not 2:4 sparse"


def test_backend_selection_on_cpu():
    cpu = torch.device("cpu")
    assert [b.name for b in select_backends("auto", cpu)] == ["int8_weight_only", "int4_weight_only"]
    assert select_backends("none", cpu) == []
    with pytest.raises(UserError, match="cannot run on cpu; supported on cpu: int4_weight_only, int8_weight_only"):
        select_backends(["sparse_2_4"], cpu)
    with pytest.raises(UserError, match="unknown backend 'fast'"):
        select_backends(["fast"], cpu)


def test_requesting_a_gpu_backend_on_cpu_exits_2(tiny_overrides, capsys):
    from compress_order.cli import main

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
