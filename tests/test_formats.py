"""Floating-point element formats and their grids (compress_order/numerics/formats.py), checked against torch's own float8
cast and the formats' published definitions."""

from __future__ import annotations

import pytest
import torch

from compress_order.numerics.formats import (
    E2M1_MAX, E4M3_MAX, FloatGrid, codebook, e4m3, fit_float_grid, nearest_codes, round_to_codebook,
)  # fmt: skip


def test_codebooks_hold_the_formats_values_and_one_zero():
    fp4 = codebook(4)
    assert fp4.tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    fp8 = codebook(8)
    assert fp8.numel() == 253 and float(fp8.max()) == E4M3_MAX and float(fp8.min()) == -E4M3_MAX  # 256 - 2 NaN - -0
    assert 2.0**-9 in fp8.tolist()  # the smallest subnormal


def test_rounding_to_e4m3_matches_torchs_float8_cast():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000) * 30, torch.randn(2000) * 0.01, codebook(8)])
    x = x.clamp(-E4M3_MAX, E4M3_MAX)
    mine = codebook(8)[nearest_codes(x, codebook(8))]
    assert torch.equal(mine, x.to(torch.float8_e4m3fn).float())
    assert torch.equal(e4m3(x), mine)


def test_e2m1_ties_go_to_the_even_mantissa_and_saturate():
    book = codebook(4)
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -2.5, -5.0])
    assert book[nearest_codes(x, book)].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -2.0, -4.0]


@pytest.mark.parametrize("bits", [4, 8])
def test_the_fast_rounding_of_activations_equals_the_indexed_codebook_path(bits):
    torch.manual_seed(0)
    book = codebook(bits)
    mids = (book[1:] + book[:-1]) / 2  # every tie, both signs
    ulp = torch.nextafter(mids, torch.full_like(mids, float("inf"))) - mids
    x = torch.cat([torch.randn(50000) * float(book[-1]) / 2, torch.randn(5000) * 1e-3, book, mids, mids + ulp,
                   mids - ulp, torch.tensor([1e4, -1e4, 0.0, -0.0])])  # fmt: skip
    fast = round_to_codebook(x, bits)
    assert torch.equal(fast, book[nearest_codes(x, book)])  # -0 == +0
    assert torch.isin(fast, book).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,group", [("int", 32), ("int", -1), ("fp8", -1), ("nvfp4", 16), ("mxfp4", 32)])
def test_project_float_is_the_projection_value_for_value(fmt, group, dtype):
    """The invariant check's projection (scales broadcast, in place; codebook rounding without a search) equals
    `project` on weights off the grid, on it, a step beside it, far out of range and not finite; row slices too."""
    from compress_order.numerics.formats import fit_weight_grid

    torch.manual_seed(3)
    w = (torch.randn(24, 128) * torch.rand(24, 1) * 4).to(dtype)
    g = fit_weight_grid(w, fmt, 8 if fmt in ("int", "fp8") else 4, group, sym=False)
    q = g.project(w)
    beside = torch.nextafter(q, torch.full_like(q, float("inf")))
    wild = q.clone()
    wild[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4, -0.0, -1e-30]).to(dtype)
    for x in (w, q, beside, (q.float() * (1 + 2**-9)).to(dtype), wild):
        want, nan = g.project(x).float(), x.isnan()
        got = g.project_float(x)
        parts = torch.cat([g.project_float(x[i : i + 5], slice(i, i + 5)) for i in range(0, 24, 5)])
        for mine in (got, parts):
            assert bool(((mine == want) | nan).all())  # -0 == +0
            assert bool((mine.to(dtype) != x)[nan].all())  # a NaN weight is off the grid either way


@pytest.mark.parametrize("fmt,group", [("fp8", -1), ("fp8", 128), ("nvfp4", 16), ("mxfp4", 32)])
def test_a_fitted_grid_holds_its_projection_exactly_and_keeps_zeros(fmt, group):
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.rand(32, 1)
    w[:, :40] = 0  # pruned weights
    g = fit_float_grid(w, fmt, group)
    assert g.problem() is None
    q = g.project(w)
    assert torch.equal(g.project(q), q)  # on the grid: projection is idempotent
    assert bool((q[:, :40] == 0).all())
    assert torch.equal(g.dequant(g.codes(q)), q)
    levels = max(len(torch.unique(row)) for row in q.reshape(-1, g.group_size))
    assert levels <= codebook(g.bits).numel()
    rel = float((q - w).norm() / w.norm())
    assert rel < {"fp8": 0.05, "nvfp4": 0.15, "mxfp4": 0.2}[fmt]


def test_nvfp4_scales_are_e4m3_times_one_tensor_scale_and_mx_scales_powers_of_two():
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    nv = fit_float_grid(w, "nvfp4", 16)
    stored = nv.scale / nv.tensor_scale
    torch.testing.assert_close(e4m3(stored), stored)
    assert float(nv.tensor_scale) == pytest.approx(float(w.abs().max()) / (E2M1_MAX * E4M3_MAX))
    mx = fit_float_grid(w, "mxfp4", 32)
    assert torch.equal(torch.exp2(torch.round(torch.log2(mx.scale))), mx.scale)
    assert FloatGrid("mxfp4", 32, mx.scale * 1.1).problem() == "MX scales are not powers of two"


def test_round_column_is_the_projection_of_one_column():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    g = fit_float_grid(w, "nvfp4", 16)
    q = g.project(w)
    for j in (0, 17, 63):
        assert torch.equal(g.round_column(j, w[:, j]), q[:, j])
