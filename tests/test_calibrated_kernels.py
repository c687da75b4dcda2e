"""Calibrated stages (Wanda, SparseGPT, GPTQ, joint) on one layer: the kernels on random matrices beat their
data-free counterparts and keep every constraint an earlier stage set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from helpers import tiny_llama_model

from compress_order.stages.calibration import calibrate_and_compress
from compress_order.numerics.constraints import nm_holds, required_zeros
from compress_order.core.errors import UserError
from compress_order.modeling.hessian import HessianStats, damped_inverse_cholesky, layer_columns
from compress_order.numerics.formats import fit_float_grid
from compress_order.numerics.obs import obs_solve
from compress_order.numerics.prune import row_quota_mask, spread_quota
from compress_order.stages.base import Stage
from compress_order.stages.gptq import GPTQ
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.rtn import RTN
from compress_order.stages.sparsegpt import SparseGPT
from compress_order.stages.sparsegpt_gptq import SparseGPTGPTQ
from compress_order.stages.wanda import Wanda
from compress_order.modeling.targets import Target, find_targets

# ----------------------------------------------------------------------------------------------- helpers


def correlated_inputs(n: int, cols: int, seed: int = 0) -> Tensor:
    """Non-isotropic inputs: column scales over two decades and strong correlations (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return (torch.randn(n, cols, generator=g) @ mix) * scale


def linear_target(rows: int = 32, cols: int = 64, seed: int = 1, dtype: torch.dtype = torch.float32) -> Target:
    torch.manual_seed(seed)
    lin = nn.Linear(cols, rows, bias=False).to(dtype)
    return Target("lin", lin)


def stats_for(t: Target, X: Tensor, diag_only: bool = False) -> HessianStats:
    s = HessianStats(t.module, diag_only=diag_only)
    for chunk in X.split(100):  # several batches: the running average must equal one big one
        s.add_batch(chunk.to(t.module.weight.dtype))
    return s


def recon_error(W: Tensor, W_hat: Tensor, X: Tensor) -> float:
    return float(((W.float() - W_hat.float()) @ X.T).norm())


def run_stage(stage: Stage, t: Target, X: Tensor) -> Tensor:
    stage.compress(t, stats_for(t, X) if stage.needs else None)
    t.check()
    return t.weight.clone()


# ----------------------------------------------------------------------------------------------- kernels


def test_hessian_is_running_average_of_2_xtx():
    t = linear_target()
    X = correlated_inputs(300, 64)
    s = stats_for(t, X)
    assert s.n == 300
    torch.testing.assert_close(s.H, 2 / 300 * X.T @ X, rtol=1e-4, atol=1e-4)
    d = stats_for(t, X, diag_only=True)
    torch.testing.assert_close(d.diag(), s.diag(), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError):
        d.H


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (1, 2, 0, 2), (2, 1, "same", 1)])
def test_conv_columns_match_flattened_weight(groups, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)
    x = torch.randn(2, 4, 9, 9)
    cols = layer_columns(conv, x)
    assert cols.shape[1] == conv.weight[0].numel()
    y = conv(x)  # (B, out, H', W'): each group's outputs are W_g · patches of its inputs
    per_group = conv.out_channels // groups
    w2d = conv.weight.flatten(1)
    L = y.shape[2] * y.shape[3]
    for g in range(groups):
        patches = cols.view(2, groups, L, -1)[:, g]  # (B, L, cols)
        mine = patches @ w2d[g * per_group : (g + 1) * per_group].T
        ref = y[:, g * per_group : (g + 1) * per_group].flatten(2).transpose(1, 2)
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_spread_quota_is_exact_and_respects_forced():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        units = int(torch.randint(1, 12, (1,), generator=g))
        sizes = torch.randint(1, 50, (units,), generator=g).tolist()
        forced = [int(torch.randint(0, s + 1, (1,), generator=g)) for s in sizes]
        total = int(torch.randint(0, sum(sizes), (1,), generator=g))
        q = spread_quota(total, sizes, forced)
        assert sum(q) == max(total, sum(forced))
        assert all(f <= k <= s for f, k, s in zip(forced, q, sizes))


def test_row_quota_mask_exact_total_balanced_rows_and_prior():
    torch.manual_seed(0)
    score = torch.rand(7, 10)
    for sp in (0.25, 0.3, 0.5):
        k = required_zeros(sp, 70)
        m = row_quota_mask(score, k)
        per_row = (~m).sum(1)
        assert int(per_row.sum()) == k and int(per_row.max() - per_row.min()) <= 1
    prior = torch.rand(7, 10) > 0.2  # ~14 pruned earlier, unevenly
    m = row_quota_mask(score, 35, prior)
    assert int((~m).sum()) == 35 and not bool((m & ~prior).any())


def test_damped_inverse_cholesky_handles_dead_inputs():
    X = correlated_inputs(200, 16)
    X[:, 3] = 0  # an input calibration never activates
    H = 2 / 200 * X.T @ X
    U = damped_inverse_cholesky(H, 0.01)
    assert torch.isfinite(U).all() and torch.equal(U, U.triu())
    Hd = H.clone()
    Hd[3, 3] = 1
    Hd += 0.01 * Hd.diagonal().mean() * torch.eye(16)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_sparsegpt_and_wanda_beat_magnitude(nm):
    X = correlated_inputs(1000, 64)
    errs = {}
    for name, stage in {
        "magnitude": Magnitude(0.5, nm, name="magnitude"),
        "magnitude_row": Magnitude(0.5, nm, scope="row", name="magnitude_row"),
        "wanda": Wanda(0.5, nm, name="wanda"),
        "sparsegpt": SparseGPT(0.5, nm, blocksize=16, name="sparsegpt"),
    }.items():
        t = linear_target()
        W = t.weight.clone()
        W_hat = run_stage(stage, t, X)
        assert int((~t.constraint.mask).sum()) == W.numel() // 2
        if nm:
            assert nm_holds(t.constraint.mask, 2, 4)
        errs[name] = recon_error(W, W_hat, X)
    assert errs["sparsegpt"] < errs["wanda"] <= min(errs["magnitude"], errs["magnitude_row"]), errs


@pytest.mark.parametrize(
    "group_size,act_order,static,sym",
    [(-1, False, False, False), (16, False, False, False), (16, True, True, False), (-1, True, False, True)],
)
def test_gptq_beats_rtn_at_3_bits(group_size, act_order, static, sym):
    X = correlated_inputs(1000, 64)
    t_rtn, t_gptq = linear_target(), linear_target()
    W = t_rtn.weight.clone()
    e_rtn = recon_error(W, run_stage(RTN(3, group_size, sym, name="rtn"), t_rtn, X), X)
    gptq = GPTQ(3, group_size, sym, act_order=act_order, static_groups=static, blocksize=16, name="gptq")
    e_gptq = recon_error(W, run_stage(gptq, t_gptq, X), X)
    g = t_gptq.constraint.grid
    assert torch.equal(g.project(t_gptq.weight), t_gptq.weight)
    assert g.scale.shape == (32, 1 if group_size < 0 else 64 // group_size)
    assert e_gptq < 0.95 * e_rtn, (e_gptq, e_rtn)


def test_gptq_keeps_mask_zeros_and_nm_and_sends_no_error_from_pruned():
    X = correlated_inputs(600, 64)
    t = linear_target()
    run_stage(SparseGPT(0.5, "2:4", name="sparsegpt"), t, X)
    mask = t.constraint.mask.clone()
    run_stage(GPTQ(3, 16, name="gptq"), t, X)
    assert torch.equal(t.constraint.mask, mask) and nm_holds(mask, 2, 4)
    assert bool((t.weight[~mask] == 0).all())
    # Pruned weights take no part: with only pruned weights in a column, the others are not updated by it.
    W = torch.randn(4, 8)
    prior = torch.ones(4, 8, dtype=torch.bool)
    prior[:, 0] = False
    U = damped_inverse_cholesky(stats_for(Target("x", nn.Linear(8, 4)), correlated_inputs(100, 8)).H, 0.01)
    out, keep = obs_solve(W, U, prior, blocksize=3)
    same, _ = obs_solve(W * prior, U, prior, blocksize=3)
    assert torch.equal(keep, prior) and torch.equal(out, same) and bool((out[:, 0] == 0).all())


@pytest.mark.parametrize("first", ["rtn", "gptq"])
@pytest.mark.parametrize("nm", [None, "2:4"])
def test_sparsegpt_on_quantized_layer_stays_on_grid_and_hits_target(first, nm):
    X = correlated_inputs(600, 64)
    t = linear_target()
    quant = RTN(3, 16, name="rtn") if first == "rtn" else GPTQ(3, 16, name="gptq")
    run_stage(quant, t, X)
    grid = t.constraint.grid
    before = t.weight.clone()
    run_stage(SparseGPT(0.5, nm, blocksize=16, name="sparsegpt"), t, X)
    assert t.constraint.grid is grid and torch.equal(grid.project(t.weight), t.weight)
    assert int((~t.constraint.mask).sum()) == before.numel() // 2
    assert not torch.equal(before * t.constraint.mask, t.weight)  # the kept weights were updated (re-rounded)


def test_joint_records_mask_and_grid_exactly():
    X = correlated_inputs(600, 64)
    t = linear_target()
    W = t.weight.clone()
    run_stage(SparseGPTGPTQ(0.7, 3, group_size=16, blocksize=16, name="sparsegpt+gptq"), t, X)
    c = t.constraint
    assert int((~c.mask).sum()) == required_zeros(0.7, W.numel())
    assert torch.equal(c.grid.project(t.weight), t.weight) and c.applied == ["sparsegpt+gptq"]
    t2 = linear_target()
    run_stage(SparseGPT(0.7, blocksize=16, name="sparsegpt"), t2, X)
    run_stage(GPTQ(3, 16, blocksize=16, name="gptq"), t2, X)
    e_joint, e_seq = recon_error(W, t.weight, X), recon_error(W, t2.weight, X)
    assert e_joint < 1.25 * e_seq, (e_joint, e_seq)  # one pass is about as good as two


# ----------------------------------------------------------------------------------------------- grid: keep | refit


def pruned_alone(t: Target, X: Tensor, sparsity: float, nm: str | None) -> Tensor:
    """What SparseGPT writes on `t`'s current weights and mask without any grid: refit's first solve."""
    c = t.constraint
    u = Target("alone", nn.Linear(t.shape[1], t.shape[0], bias=False))
    u.set_weight(t.weight.clone())
    u.constraint.mask = None if c.mask is None else c.mask.clone()
    return run_stage(SparseGPT(sparsity, nm, blocksize=16, name="sparsegpt"), u, X)


def minmax_by_hand(w: Tensor, bits: int, gs: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and integer zero-point of every (row, group) of w, from the min-max definition (0 in the range)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // gs, gs)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    maxq = 2**bits - 1
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


QUANTIZERS = {
    "rtn3-g16": lambda: RTN(3, 16, name="rtn"),
    "rtn4-g16-sym": lambda: RTN(4, 16, sym=True, name="rtn"),
    "rtn4-channel": lambda: RTN(4, -1, name="rtn"),
    "gptq3-g16": lambda: GPTQ(3, 16, blocksize=16, name="gptq"),
    "rtn-mxfp4": lambda: RTN(4, 32, format="mxfp4", name="rtn"),
    "rtn-nvfp4": lambda: RTN(4, 16, format="nvfp4", name="rtn"),
}


@pytest.mark.parametrize("nm", [None, "2:4"])
@pytest.mark.parametrize("quant", list(QUANTIZERS))
def test_sparsegpt_refit_lies_on_a_fresh_grid_of_the_same_kind(quant, nm):
    X = correlated_inputs(600, 64)
    t = linear_target()
    run_stage(Magnitude(0.2, name="magnitude"), t, X)  # earlier zeros
    quantizer = QUANTIZERS[quant]()
    run_stage(quantizer, t, X)
    c = t.constraint
    earlier, earlier_mask = c.grid, c.mask.clone()
    sparsity = 0.5 if nm else 0.6
    alone = pruned_alone(t, X, sparsity, nm)
    run_stage(SparseGPT(sparsity, nm, blocksize=16, grid="refit", name="sparsegpt"), t, X)
    w, g = t.weight, c.grid
    # A new grid of the earlier one's kind, recorded, and every weight exactly on it (t.check() ran too).
    assert g is not earlier and type(g) is type(earlier)
    assert (g.fmt, g.bits, g.group_size, g.sym, g.scale.shape) == (
        earlier.fmt, earlier.bits, earlier.group_size, earlier.sym, earlier.scale.shape,
    )  # fmt: skip
    assert not torch.equal(g.scale, earlier.scale)
    codes = g.codes(w)
    assert torch.equal(g.dequant(codes), w) and torch.equal(codes, codes.round())
    # Its ranges are those of the pruning's own result, group by group.
    if g.fmt == "int":
        scale, zero = minmax_by_hand(alone, g.bits, g.group_size, g.sym)
        torch.testing.assert_close(g.scale, scale, rtol=1e-6, atol=0)
        assert torch.equal(g.zero, zero) and bool(((codes >= 0) & (codes <= g.maxq)).all())
    elif g.fmt == "mxfp4":  # 2^(floor(log2 max|w|) - 2): E2M1's largest value is 1.5 · 2^2
        amax = alone.abs().reshape(32, -1, 32).amax(-1)
        assert torch.equal(g.scale, torch.exp2(torch.floor(torch.log2(amax)) - 2))
    else:
        fresh = fit_float_grid(alone, g.fmt, g.group_size)
        assert torch.equal(g.scale, fresh.scale) and torch.equal(g.tensor_scale, fresh.tensor_scale)
        assert g.problem() is None
    # Earlier zeros stay zero, the mask only grows, and the target is met exactly.
    assert not bool((earlier_mask < c.mask).any()) and bool((w[~earlier_mask] == 0).all())
    if nm:
        assert nm_holds(c.mask, 2, 4)
    else:
        assert int((~c.mask).sum()) == required_zeros(0.6, w.numel())
    assert c.applied == ["magnitude", quantizer.label, "sparsegpt"]


def twin_inputs(n: int = 800, pairs: int = 32, seed: int = 0) -> Tensor:
    """Inputs in near-identical pairs of columns: pruning one of a pair moves its weight onto its twin, so the
    twin's value leaves the range a quantizer fit before pruning."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, pairs, generator=g)
    return torch.stack([base, base + 0.05 * torch.randn(n, pairs, generator=g)], 2).reshape(n, 2 * pairs)


@pytest.mark.parametrize("bits", [8, 4])
def test_refit_reconstructs_better_where_the_earlier_range_clamps(bits):
    X = twin_inputs()
    errs, clamped = {}, None
    for mode in ("keep", "refit"):
        t = linear_target()
        run_stage(RTN(bits, 16, name="rtn"), t, X)
        Wq, earlier = t.weight.clone(), t.constraint.grid
        if clamped is None:  # the updates the earlier ranges cannot hold
            alone = pruned_alone(t, X, 0.5, None)
            clamped = int((earlier.dequant(earlier.codes(alone)) - alone).abs().gt(earlier._expand(earlier.scale)).sum())
        run_stage(SparseGPT(0.5, blocksize=16, grid=mode, name="sparsegpt"), t, X)
        errs[mode] = recon_error(Wq, t.weight, X)  # SparseGPT's objective: the entering layer's output
    assert clamped > 50, clamped  # of 1024 kept weights
    assert errs["refit"] < 0.8 * errs["keep"], errs


def test_keep_is_the_default_and_refit_changes_nothing_without_an_earlier_grid():
    X = correlated_inputs(600, 64)
    out = {}
    for quantized in (False, True):
        for mode in (None, "keep", "refit"):
            t = linear_target()
            if quantized:
                run_stage(GPTQ(3, 16, blocksize=16, name="gptq"), t, X)
            grid = t.constraint.grid
            kw = {} if mode is None else {"grid": mode}
            out[quantized, mode] = run_stage(SparseGPT(0.5, blocksize=16, name="sparsegpt", **kw), t, X)
            assert (t.constraint.grid is grid) == (mode != "refit" or not quantized)
    assert torch.equal(out[False, None], out[False, "keep"]) and torch.equal(out[False, None], out[False, "refit"])
    assert torch.equal(out[True, None], out[True, "keep"]) and not torch.equal(out[True, None], out[True, "refit"])


def test_grid_setting_is_checked():
    with pytest.raises(UserError, match=r"^sparsegpt grid=bogus is unknown; valid: keep, refit$"):
        SparseGPT(0.5, grid="bogus", name="sparsegpt")
    with pytest.raises(UserError, match=r"grid=true is unknown"):  # booleans are shown as the yaml writes them
        SparseGPT(0.5, grid=True, name="sparsegpt")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_stay_exactly_on_grid(dtype):
    X = correlated_inputs(400, 64)
    for stages in (
        [GPTQ(3, 16, name="gptq"), SparseGPT(0.5, name="sparsegpt")],
        [SparseGPTGPTQ(0.5, 4, group_size=32, name="j")],
    ):
        t = linear_target(dtype=dtype)
        for s in stages:
            s.compress(t, stats_for(t, X))
            t.check()
        assert t.weight.dtype == dtype


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="static_groups"):
        GPTQ(4, 128, act_order=True, name="gptq")
    GPTQ(4, -1, act_order=True, name="gptq")
    GPTQ(4, 128, act_order=True, static_groups=True, name="gptq")
    with pytest.raises(UserError, match="0 < N < M"):
        SparseGPT(0.5, "4:4", name="sparsegpt")
    with pytest.raises(UserError, match="contradicts"):
        Wanda(0.7, "2:4", name="wanda")
    with pytest.raises(UserError, match="row, layer"):
        Wanda(0.5, scope="block", name="wanda")
    with pytest.raises(UserError, match="blocksize"):
        SparseGPT(0.5, blocksize=0, name="sparsegpt")
    with pytest.raises(UserError, match="percdamp"):
        GPTQ(4, percdamp=-1, name="gptq")
    model = tiny_llama_model(layers=1)
    targets = find_targets(model, ["lm_head"])
    with pytest.raises(UserError, match="nsamples"):
        calibrate_and_compress(model, targets, [], SparseGPT(0.5, name="sparsegpt"))
