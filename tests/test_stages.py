"""Magnitude and RTN alone and in both orders keep every constraint; the kernels do what they claim."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_order.numerics.constraints import LayerConstraint, check_invariants, check_layers, levels_per_group
from compress_order.core.errors import InvariantError, UserError
from compress_order.numerics.formats import fit_weight_grid
from compress_order.numerics.quant import fit_grid
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.rtn import RTN
from compress_order.modeling.targets import ModelState, find_targets


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 256), nn.Linear(256, 10))


def _apply(stage, state):
    for t in state.targets.values():
        stage.compress(t)
    state.check()


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("order", [("prune", "quant"), ("quant", "prune")])
def test_both_orders_keep_constraints(order, group_size, sym):
    bits, sparsity = 3, 0.7
    model = _model()
    state = ModelState(model, find_targets(model, skip=[r"^3$"]))
    stages = {"prune": Magnitude(sparsity, name="magnitude"), "quant": RTN(bits, group_size, sym, name="rtn")}
    for key in order:
        _apply(stages[key], state)
    for t in state.targets.values():
        w, c = t.weight, t.constraint
        assert c.applied == [stages[k].label for k in order]
        assert int((w == 0).sum()) >= round(sparsity * w.numel())  # sparsity ≥ target
        assert torch.all(w[~c.mask] == 0)  # nothing refilled
        assert torch.equal(c.grid.project(w), w)  # every weight exactly on the grid
        gs = w.shape[1] if group_size == -1 else group_size
        assert int(levels_per_group(w, gs).max()) <= 2**bits
    assert not any(n == "3" for n in state.targets)  # skipped layer is untouched


def test_quantizing_a_pruned_layer_never_refills_zeros():
    model = _model()
    state = ModelState(model, find_targets(model))
    _apply(Magnitude(0.5, name="m"), state)
    masks = {n: t.constraint.mask.clone() for n, t in state.targets.items()}
    _apply(RTN(2, 32, False, name="r"), state)
    for n, t in state.targets.items():
        assert torch.equal(t.constraint.mask, masks[n]) and torch.all(t.weight[~masks[n]] == 0)


def test_pruning_a_quantized_layer_keeps_the_grid_and_second_prune_keeps_the_mask():
    model = _model()
    state = ModelState(model, find_targets(model))
    _apply(RTN(4, 64, True, name="r"), state)
    grids = {n: t.constraint.grid.scale.clone() for n, t in state.targets.items()}
    _apply(Magnitude(0.3, name="m1"), state)
    first = {n: t.constraint.mask.clone() for n, t in state.targets.items()}
    _apply(Magnitude(0.6, name="m2"), state)
    for n, t in state.targets.items():
        assert torch.equal(t.constraint.grid.scale, grids[n])
        assert not torch.any(t.constraint.mask & ~first[n])  # pruned stays pruned
        assert abs(float((t.weight == 0).float().mean()) - 0.6) < 0.05
        assert t.constraint.min_sparsity == 0.6


def test_nm_magnitude_pattern_is_exact():
    model = _model()
    state = ModelState(model, find_targets(model))
    _apply(Magnitude(0, nm="2:4", name="m"), state)
    _apply(RTN(3, 128, False, name="r"), state)
    for t in state.targets.values():
        kept = t.constraint.mask.reshape(t.shape[0], -1, 4).sum(-1)
        assert torch.all(kept == 2)


def test_rtn_matches_hand_computed_grid():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    g = fit_grid(w, bits=2, group_size=4, sym=False)
    # range [-1, 2] over 3 steps: scale 1, zero-point 1 → levels -1, 0, 1, 2
    assert torch.allclose(g.scale, torch.tensor([[1.0]])) and g.zero.item() == 1
    assert torch.equal(g.project(w), torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))  # 0.5 rounds half to even
    gs = fit_grid(w, bits=2, group_size=4, sym=True)
    assert gs.zero.item() == 2 and torch.allclose(gs.scale, torch.tensor([[4.0 / 3.0]]))


def test_invariant_violations_are_errors():
    w = torch.ones(4, 8)
    c = LayerConstraint(mask=torch.ones(4, 8, dtype=torch.bool), min_sparsity=0.5, applied=["m"])
    with pytest.raises(InvariantError, match="required by sparsity"):
        check_invariants("x", w, c)
    mask = c.mask
    mask[:, :4] = False
    c.mask = mask  # a constraint's mask is replaced, not edited in place (it is held as bits)
    with pytest.raises(InvariantError, match="non-zero"):
        check_invariants("x", w, c)
    grid = fit_grid(torch.randn(4, 8), 2, 8, False)
    with pytest.raises(InvariantError, match="off the 2-bit grid"):
        check_invariants("x", torch.randn(4, 8) * 0.37, LayerConstraint(grid=grid, applied=["r"]))


def _two_of_four(w: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask keeping the two largest |w| of every 4 consecutive inputs."""
    rows, cols = w.shape
    top = w.abs().reshape(rows, cols // 4, 4).topk(2, -1).indices
    return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,bits,group", [("int", 4, 32), ("nvfp4", 4, 16), ("fp8", 8, -1)])
def test_the_fast_check_catches_one_off_grid_weight_one_refill_and_one_broken_nm_group(fmt, bits, group, dtype):
    """check_invariants and check_layers test a layer in a few vectorised passes before counting anything: one
    weight a single ulp off its grid, one pruned weight refilled with a value of the grid, and one group of 4
    keeping 3 (same sparsity overall) are each caught, with the message the direct count gives."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    mask = _two_of_four(w)
    grid = fit_weight_grid(w * mask, fmt, bits, group, sym=False)
    q = grid.project((w * mask).to(dtype)) * mask
    c = LayerConstraint(mask=mask, min_sparsity=0.5, nm=(2, 4), grid=grid, applied=["m", "r"])
    check_invariants("x", q, c)
    check_layers([("x", lambda: q, c)])
    kept = mask.nonzero()
    (i, j), (_, j2) = kept[0].tolist(), kept[1].tolist()  # two kept weights of row i, same group of 4
    assert j // 4 == j2 // 4

    def caught(w2: torch.Tensor, c2: LayerConstraint, match: str) -> None:
        with pytest.raises(InvariantError, match=match):
            check_invariants("x", w2, c2)
        with pytest.raises(InvariantError, match=match):
            check_layers([("ok", lambda: q, c), ("x", lambda: w2, c2), ("ok2", lambda: q, c)])

    off = q.clone()
    off[i, j] = torch.nextafter(off[i, j].float(), torch.tensor(float("inf"))).to(dtype)
    if off[i, j] == q[i, j]:  # the float32 step vanished in the cast: one step of the dtype instead
        off[i, j] = torch.nextafter(off[i, j], torch.tensor(float("inf"), dtype=dtype))
    kind = "" if fmt == "int" else f" {fmt}"
    caught(off, c, rf"layer x after \[m > r\]: 1 weights are off the {bits}-bit{kind} grid")

    pruned = next(jj for jj in range(j // 4 * 4, j // 4 * 4 + 4) if not mask[i, jj])
    refilled = q.clone()
    refilled[i, pruned] = q[i, j]  # a value of the grid (same row and group): only the mask tells
    caught(refilled, c, "layer x after .*: 1 pruned weights are non-zero")

    # group j//4 keeps 3, another group of row i keeps 1: sparsity unchanged, the pattern broken
    other = next(g for g in range(mask.shape[1] // 4) if g != j // 4)
    give = [jj for jj in range(other * 4, other * 4 + 4) if mask[i, jj]][0]
    broken_mask = mask.clone()
    broken_mask[i, pruned], broken_mask[i, give] = True, False
    moved = q.clone()
    moved[i, give] = 0
    nm = LayerConstraint(mask=broken_mask, min_sparsity=0.5, nm=(2, 4), grid=grid, applied=["m", "r"])
    caught(moved, nm, "2:4 pattern broken")


def test_check_layers_names_the_first_broken_layer_in_order():
    w = torch.ones(4, 8)
    bad = LayerConstraint(mask=torch.zeros(4, 8, dtype=torch.bool), applied=["m"])  # every weight refilled
    fine = LayerConstraint()
    with pytest.raises(InvariantError, match="layer b "):
        check_layers([("a", lambda: w, fine), ("b", lambda: w, bad), ("c", lambda: w, bad)])
    with pytest.raises(InvariantError, match="mask shape"):  # found on the host, still in order
        check_layers(
            [("a", lambda: w, fine), ("b", lambda: w, LayerConstraint(mask=torch.ones(2, 2, dtype=torch.bool)))]
        )
    check_layers([("a", lambda: w, fine), ("b", lambda: torch.zeros(4, 8), bad)])


def test_stage_settings_are_checked():
    with pytest.raises(UserError, match="bits=9"):
        RTN(9, name="r")
    with pytest.raises(UserError, match=r"outside \[0, 1\)"):
        Magnitude(1.0, name="m")
    with pytest.raises(UserError, match="N < M"):
        Magnitude(0.5, nm="4:4", name="m")
    with pytest.raises(UserError, match="contradicts"):
        Magnitude(0.7, nm="2:4", name="m")
    model = _model()
    with pytest.raises(UserError, match="does not divide"):
        RTN(4, 96, name="r").validate(find_targets(model))


def test_row_scope_prunes_the_exact_layer_total():
    torch.manual_seed(0)
    w = torch.randn(19, 128)
    from compress_order.numerics.prune import select_mask

    mask = select_mask(w.abs(), 0.3, scope="row")
    assert int((~mask).sum()) == round(0.3 * w.numel())
    per_row = (~mask).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1
