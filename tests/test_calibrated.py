"""Calibrated stages (Wanda, SparseGPT, GPTQ, joint) and the block-by-block driver: kernels on random matrices,
every order of pairs on a tiny LLaMA, the driver's statistics against a plain full forward, and a run end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from compress_order.calibration import calibrate_and_compress, capture_block_calls, find_blocks
from compress_order.constraints import nm_holds, required_zeros
from compress_order.errors import UserError
from compress_order.hessian import HessianStats, damped_inverse_cholesky, layer_columns
from compress_order.obs import obs_solve
from compress_order.prune import row_quota_mask, spread_quota
from compress_order.stages.base import Stage
from compress_order.stages.gptq import GPTQ
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.rtn import RTN
from compress_order.stages.sparsegpt import SparseGPT
from compress_order.stages.sparsegpt_gptq import SparseGPTGPTQ
from compress_order.stages.wanda import Wanda
from compress_order.targets import ModelState, Target, find_targets

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


def assert_driver_statistics_equal(model, targets, batches, ref: dict) -> None:
    """The driver's statistics, all layers at once and group by group, equal those of a plain full forward."""
    for ts in (False, True):
        rec = Recorder()
        calibrate_and_compress(model, targets, batches, rec, {"true_sequential": ts})
        assert rec.H.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(rec.H[n], ref[n], rtol=1e-5, atol=1e-6)


def tiny_llama_model(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def token_batches(n: int = 4, seqlen: int = 32, vocab: int = 40, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


def apply(stage: Stage, state: ModelState, batches: list, true_sequential: bool = False) -> None:
    """What the runner does (validate, then apply_stage), without a task."""
    stage.validate(state.targets)
    if stage.needs is None:
        for t in state.targets.values():
            stage.compress(t, None)
    else:
        calibrate_and_compress(state.model, state.targets, batches, stage, {"true_sequential": true_sequential})
    state.check()


class Recorder(Stage):
    """A calibrated no-op that keeps the statistics it is given."""

    kind, needs = "prune", "hessian"

    def __init__(self) -> None:
        super().__init__(name="recorder")
        self.H: dict[str, Tensor] = {}

    def compress(self, target: Target, stats: HessianStats) -> None:
        self.H[target.name] = stats.H.clone()


def full_forward_hessians(model: nn.Module, targets: dict[str, Target], batches: list, **kw) -> dict[str, Tensor]:
    stats = {n: HessianStats(t.module) for n, t in targets.items()}
    hooks = [t.module.register_forward_pre_hook(lambda m, a, s=stats[n]: s.add_batch(a[0])) for n, t in targets.items()]
    with torch.no_grad():
        for b in batches:
            model(b, **kw)
    for h in hooks:
        h.remove()
    return {n: s.H for n, s in stats.items()}


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
        calibrate_and_compress(model, targets, [], SparseGPT(0.5, name="sparsegpt"), {})


# ----------------------------------------------------------------------------------------------- the driver


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2_sliding"])
def test_driver_statistics_equal_a_full_forward(family):
    """Block by block, with per-block keywords (sliding-window masks differ between Qwen2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(intermediate_size=64, num_key_value_heads=2, **small)),
        "opt": lambda: OPTForCausalLM(OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **small)),
        "qwen2_sliding": lambda: Qwen2ForCausalLM(Qwen2Config(
            intermediate_size=64, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
            max_window_layers=1, attn_implementation="eager", **small)),
    }[family]().eval()  # fmt: skip
    targets = find_targets(model, ["lm_head"])
    name, blocks = find_blocks(model, targets)
    assert name in ("model.layers", "model.decoder.layers")
    batches = token_batches(3, 16, 50)
    ref = full_forward_hessians(model, targets, batches, use_cache=False)
    assert_driver_statistics_equal(model, targets, batches, ref)
    if family == "qwen2_sliding":
        _, calls = capture_block_calls(model, name, blocks, batches[:1], torch.device("cpu"))
        assert not torch.equal(calls[0][0].kwargs["attention_mask"], calls[1][0].kwargs["attention_mask"])


@pytest.mark.parametrize("true_sequential", [False, True])
def test_next_block_sees_compressed_outputs(true_sequential):
    model = tiny_llama_model(layers=2)
    targets = find_targets(model, ["lm_head"])
    batches = token_batches()
    seen: dict[str, Tensor] = {}

    class Spy(SparseGPT):
        def compress(self, target: Target, stats: HessianStats) -> None:
            seen[target.name] = stats.H.clone()
            super().compress(target, stats)

    apply(Spy(0.5, name="sparsegpt"), ModelState(model, targets), batches, true_sequential)
    # After the fact, a full forward of the compressed model feeds the last block's layers what they saw,
    # except layers whose inputs depend on their own block's compressed layers (unless true-sequential).
    ref = full_forward_hessians(model, targets, batches, use_cache=False)
    last = "model.layers.1."
    same = [n for n in ref if n.startswith(last)] if true_sequential else [last + "self_attn.q_proj"]
    for n in same:
        torch.testing.assert_close(seen[n], ref[n], rtol=1e-4, atol=1e-5)
    if not true_sequential:
        assert not torch.allclose(seen[last + "mlp.down_proj"], ref[last + "mlp.down_proj"])


def test_true_sequential_groups_share_statistics_in_forward_order():
    model = tiny_llama_model(layers=1)
    targets = find_targets(model, ["lm_head"])
    order: list[tuple[str, HessianStats]] = []

    class Spy(Recorder):
        def compress(self, target: Target, stats: HessianStats) -> None:
            order.append((target.name.split(".")[-1], stats))  # kept alive: identity is meaningful

    calibrate_and_compress(model, targets, token_batches(2), Spy(), {"true_sequential": True})
    names = [n for n, _ in order]
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    st = [s for _, s in order]
    assert st[0] is st[1] is st[2] and st[4] is st[5]
    assert len({id(st[0]), id(st[3]), id(st[4]), id(st[6])}) == 4


def test_whole_model_fallback_for_a_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    targets = find_targets(model)
    assert find_blocks(model, targets) is None
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    rec = Recorder()
    calibrate_and_compress(model, targets, batches, rec, {})
    ref = full_forward_hessians(model, targets, batches)
    for n in ref:
        torch.testing.assert_close(rec.H[n], ref[n], rtol=1e-5, atol=1e-6)
    state = ModelState(model, targets)
    dense = state.snapshot()
    for stages in ([Wanda(0.5, name="wanda"), GPTQ(4, name="gptq")], [GPTQ(4, name="gptq"), SparseGPT(0.5, name="s")]):
        state.restore(dense)
        for s in stages:
            apply(s, state, batches, true_sequential=True)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: Tensor, scale: float = 1.0) -> tuple[Tensor, None]:
        return (x + self.fc2(torch.relu(self.fc1(x))) * scale, None)  # tuple output, like older HF blocks


class _Chained(nn.Module):
    def __init__(self, between: bool = False) -> None:
        super().__init__()
        self.pre, self.head, self.between = nn.Linear(8, 8), nn.Linear(8, 4), between
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        for b in self.blocks:
            x = b(x, scale=0.5)[0]
            if self.between:  # work between blocks: the list is not a plain chain
                x = torch.tanh(x)
        return self.head(x)


@pytest.mark.parametrize("between", [False, True])
def test_generic_block_lists_targets_outside_them_and_non_chains(between):
    torch.manual_seed(0)
    model = _Chained(between).eval()
    targets = find_targets(model)
    assert find_blocks(model, targets)[0] == "blocks"
    batches = [torch.randn(2, 5, 8) for _ in range(3)]
    chain = capture_block_calls(model, "blocks", model.blocks, batches, torch.device("cpu"))
    assert (chain is None) == between
    if chain is not None:
        assert chain[1][1][0].kwargs == {"scale": 0.5}
    for ts in (False, True):
        rec = Recorder()
        calibrate_and_compress(model, targets, batches, rec, {"true_sequential": ts})
        ref = full_forward_hessians(model, targets, batches)
        assert rec.H.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(rec.H[n], ref[n], rtol=1e-5, atol=1e-6)
    state = ModelState(model, targets)
    apply(SparseGPT(0.5, name="sparsegpt"), state, batches)
    apply(GPTQ(4, name="gptq"), state, batches, true_sequential=True)


def test_calibration_that_reaches_no_layer_is_a_user_error():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return x * 2

    model = Unused()
    with pytest.raises(UserError, match="reach none"):
        calibrate_and_compress(model, find_targets(model), [torch.randn(2, 4)], GPTQ(4, name="gptq"), {})


# ----------------------------------------------------------------------------------------------- Sequential blocks


def tiny_vit(depth: int = 3):
    """timm's vit_tiny_patch16_224 layout (blocks in an nn.Sequential) at a 32×32 input, random weights."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth, num_classes=10)
    return model.eval()


def vit_targets(model: nn.Module) -> dict[str, Target]:
    cfg = model.pretrained_cfg
    return find_targets(model, [f"^{cfg['first_conv']}$", f"^{cfg['classifier']}$"])


def test_vit_blocks_in_a_sequential_are_calibrated_one_block_at_a_time(monkeypatch, caplog):
    """The Sequential `blocks` is found and fed block by block: statistics equal a plain full forward; a block's
    statistics exist only once the blocks before it are compressed; the next block sees compressed outputs."""
    import compress_order.calibration as calibration

    model = tiny_vit()
    targets = vit_targets(model)
    with caplog.at_level("INFO", logger="compress_order.calibration"):
        assert find_blocks(model, targets)[0] == "blocks"
    assert any(r.getMessage().startswith("decoder blocks: Block × 3 at blocks (by structure") for r in caplog.records)
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    ref = full_forward_hessians(model, targets, batches)
    assert_driver_statistics_equal(model, targets, batches, ref)

    events: list[tuple[str, str]] = []
    names = {id(t.module): n for n, t in targets.items()}

    class Logged(HessianStats):
        def __init__(self, module: nn.Module, *a, **k) -> None:
            events.append(("stats", names[id(module)]))
            super().__init__(module, *a, **k)

    seen: dict[str, Tensor] = {}

    class Spy(SparseGPT):
        def compress(self, target: Target, stats: HessianStats) -> None:
            events.append(("compress", target.name))
            seen[target.name] = stats.H.clone()
            super().compress(target, stats)

    monkeypatch.setattr(calibration, "HessianStats", Logged)
    apply(Spy(0.5, name="sparsegpt"), ModelState(model, targets), batches)
    block_of = [int(n.split(".")[1]) for _, n in events]
    assert block_of == sorted(block_of), events  # block i's statistics only after block i-1 is compressed
    ref = full_forward_hessians(model, targets, batches)  # the compressed model: what the last block was fed
    torch.testing.assert_close(seen["blocks.2.attn.qkv"], ref["blocks.2.attn.qkv"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen["blocks.2.attn.qkv"], full_forward_hessians(tiny_vit(), targets, batches)[
        "blocks.2.attn.qkv"])  # fmt: skip


def test_wanda_then_gptq_on_a_vit_keeps_every_invariant():
    model = tiny_vit(depth=2)
    state = ModelState(model, vit_targets(model))
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    for stage in (Wanda(0.5, name="wanda"), GPTQ(4, 32, name="gptq")):
        apply(stage, state, batches)  # checks zeros, sparsity and grid after each
    for t in state.targets.values():
        assert t.constraint.applied == ["wanda", "gptq"]
        assert int((t.weight == 0).sum()) >= t.weight.numel() // 2
        assert torch.equal(t.constraint.grid.project(t.weight), t.weight)


class _Loop(nn.Module):
    """Blocks in a Sequential that the forward loops over with work between them: not a plain chain."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)))

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def test_a_sequential_that_is_not_a_chain_is_calibrated_as_one_block():
    torch.manual_seed(0)
    model = _Loop().eval()
    targets = find_targets(model)
    assert find_blocks(model, targets)[0] == "blocks"
    batches = [torch.randn(2, 8) for _ in range(3)]
    assert capture_block_calls(model, "blocks", model.blocks, batches, torch.device("cpu")) is None
    rec = Recorder()
    calibrate_and_compress(model, targets, batches, rec, {})
    ref = full_forward_hessians(model, targets, batches)
    for n in ref:
        torch.testing.assert_close(rec.H[n], ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "arch,kw,want",
    [("vit_tiny_patch16_224", {"img_size": 32}, "blocks"), ("convnext_atto", {}, "stages"),
     ("efficientnet_b0", {}, "blocks"), ("mobilenetv3_small_100", {}, "blocks"), ("resnet18", {}, None)],
)  # fmt: skip
def test_timm_block_lists_are_found_from_structure(arch, kw, want):
    """A Sequential of one repeated class holding most targets; ResNet's stages are four attributes, none of
    them holding most of the model, so it stays one block."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=10, **kw).eval()
    found = find_blocks(model, vit_targets(model))
    assert (found and found[0]) == want
    if found:
        chain = capture_block_calls(model, found[0], found[1], [torch.randn(1, 3, 32, 32)], torch.device("cpu"))
        assert chain is not None and len(chain[1]) == len(found[1])


PRUNE = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}
QUANT = {"rtn": RTN, "gptq": GPTQ}


def make(name: str, nm: str | None) -> Stage:
    if name in PRUNE:
        return PRUNE[name](0.5, nm, name=name)
    return QUANT[name](3, 32, name=name)


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_every_order_of_pairs_keeps_every_promise(nm):
    """20 ordered pairs of {wanda, sparsegpt, gptq, magnitude, rtn}: invariants after every stage, the mask
    only grows, pruned weights stay exactly zero, weights stay on the grid, and the sparsity is exactly the target."""
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    state = ModelState(model, targets)
    dense = state.snapshot()
    batches = token_batches()
    names = [*PRUNE, *QUANT]
    firsts = {}
    for a in names:
        state.restore(dense)
        apply(make(a, nm), state, batches)
        firsts[a] = state.snapshot()
    for a, b in itertools.permutations(names, 2):
        state.restore(firsts[a])
        before = {n: t.constraint.clone() for n, t in targets.items()}
        apply(make(b, nm), state, batches)
        for n, t in targets.items():
            c, old = t.constraint, before[n]
            if old.mask is not None:
                assert not bool((c.mask & ~old.mask).any()), (a, b, n)
            if a in PRUNE or b in PRUNE:
                assert int((~c.mask).sum()) == t.weight.numel() // 2, (a, b, n)
                assert bool((t.weight[~c.mask] == 0).all())
                if nm:
                    assert nm_holds(c.mask, 2, 4), (a, b, n)
            if a in QUANT or b in QUANT:
                assert torch.equal(c.grid.project(t.weight), t.weight), (a, b, n)
            assert c.applied == [a, b]


def test_sparsity_is_exact_after_sparsegpt_gptq_both_ways():
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    state = ModelState(model, targets)
    dense = state.snapshot()
    for order in (["sparsegpt", "gptq"], ["gptq", "sparsegpt"]):
        state.restore(dense)
        for s in order:
            stage = SparseGPT(0.7, name=s) if s == "sparsegpt" else GPTQ(3, 32, name=s)
            apply(stage, state, token_batches())
        for t in targets.values():
            assert int((~t.constraint.mask).sum()) == required_zeros(0.7, t.weight.numel())
            assert float((t.weight == 0).float().mean()) >= 0.7 - 1e-9  # never below the target


def test_deterministic_for_a_fixed_seed():
    model = tiny_llama_model()
    targets = find_targets(model, ["lm_head"])
    state = ModelState(model, targets)
    dense = state.snapshot()
    runs = []
    for _ in range(2):
        state.restore(dense)
        for stage in (Wanda(0.5, name="wanda"), GPTQ(3, 32, name="gptq")):
            apply(stage, state, token_batches(seed=3), true_sequential=True)
        apply(SparseGPTGPTQ(0.5, 3, group_size=32, name="j"), state, token_batches(seed=3))
        runs.append(state.snapshot())
    assert all(torch.equal(runs[0][n][0], runs[1][n][0]) for n in targets)


# ----------------------------------------------------------------------------------------------- configs and runner


def test_stage_configs_build(tiny_overrides):
    from compress_order.config import compose_config
    from compress_order.stages import build_stage, stage_configs

    cfg = compose_config(tiny_overrides + ["stages=[wanda,sparsegpt,gptq]", "joint=[sparsegpt_gptq]"])
    built = [build_stage(sc) for sc in stage_configs(cfg) + stage_configs(cfg, "joint")]
    assert [type(s).__name__ for s in built] == ["Wanda", "SparseGPT", "GPTQ", "SparseGPTGPTQ"]
    assert built[-1].label == "sparsegpt+gptq" and built[-1].kind == "joint"
    assert cfg.calibration.true_sequential is False
    bad = compose_config(tiny_overrides + ["stages=[{name: gptq, act_order: true}]", "group_size=64"])
    with pytest.raises(UserError, match="act_order"):
        build_stage(stage_configs(bad)[0])


def test_run_end_to_end_with_joint(tiny_overrides, tmp_path):
    from compress_order.config import compose_config
    from compress_order.runner import run

    cfg = compose_config(
        tiny_overrides + ["stages=[wanda,gptq]", "joint=[sparsegpt_gptq]", "sparsity=0.5", "bits=4",
                          "group_size=32", "calibration.true_sequential=true", "device=cpu"]
    )  # fmt: skip
    df = run(cfg, tmp_path / "out")
    orders = set(df["order"])
    assert orders == {"dense", "wanda", "gptq", "wanda > gptq", "gptq > wanda", "sparsegpt+gptq"}
    sp = df[df.metric == "sparsity"].set_index("order")["value"]
    assert all(sp[o] >= 0.5 - 1e-9 for o in orders - {"dense", "gptq"})
    ppl = df[df.metric == "perplexity"].set_index("order")["value"]
    assert all(math.isfinite(v) for v in ppl)


# ----------------------------------------------------------------------------------------------- quality (slow)


@pytest.mark.slow
def test_quality_on_the_embedded_model(tmp_path):
    from compress_order.config import compose_config
    from compress_order.runner import run

    ppl = {}
    for stages in ("[magnitude]", "[wanda]", "[sparsegpt]", "[rtn]", "[gptq]"):
        cfg = compose_config([
            f"stages={stages}", "sparsity=0.5", "bits=3", "group_size=-1", "calibration.nsamples=32",
            "device=cpu", f"store_dir={tmp_path / 'store'}",
        ])  # fmt: skip
        df = run(cfg, tmp_path / stages.strip("[]"))
        ppl[stages.strip("[]")] = float(df[(df.metric == "perplexity") & (df.depth == 1)]["value"].iloc[0])
    assert ppl["sparsegpt"] <= ppl["magnitude"] and ppl["wanda"] <= ppl["magnitude"], ppl
    assert ppl["gptq"] <= ppl["rtn"], ppl


def test_calibration_larger_than_the_text_is_a_one_line_error(tiny_overrides, capsys):
    from compress_order.cli import main

    args = [o for o in tiny_overrides if not o.startswith("calibration.nsamples")]
    with pytest.raises(SystemExit) as exc:
        main(["run", *args, "stages=[wanda]", "calibration.nsamples=100000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lower calibration.nsamples or calibration.seqlen" in err[0]
