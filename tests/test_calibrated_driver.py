"""The block-by-block calibration driver: its statistics against a plain full forward, compressed outputs fed to the
next block, block lists of decoders, ViTs and CNNs, and every order of calibrated pairs on a tiny LLaMA."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from helpers import tiny_llama_model, token_batches

from compress_order.core.settings import Calibration
from compress_order.modeling.blocks import capture_block_calls, find_blocks
from compress_order.stages.calibration import calibrate_and_compress
from compress_order.numerics.constraints import nm_holds, required_zeros
from compress_order.core.errors import UserError
from compress_order.modeling.hessian import HessianStats
from compress_order.stages.base import Stage
from compress_order.stages.gptq import GPTQ
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.rtn import RTN
from compress_order.stages.sparsegpt import SparseGPT
from compress_order.stages.sparsegpt_gptq import SparseGPTGPTQ
from compress_order.stages.wanda import Wanda
from compress_order.modeling.targets import ModelState, Target, find_targets

# ----------------------------------------------------------------------------------------------- helpers


def assert_driver_statistics_equal(model, targets, batches, ref: dict) -> None:
    """The driver's statistics, all layers at once and group by group, equal those of a plain full forward."""
    for ts in (False, True):
        rec = Recorder()
        calibrate_and_compress(model, targets, batches, rec, Calibration(true_sequential=ts))
        assert rec.H.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(rec.H[n], ref[n], rtol=1e-5, atol=1e-6)


def apply(stage: Stage, state: ModelState, batches: list, true_sequential: bool = False) -> None:
    """What the runner does (validate, then apply_stage), without a task."""
    stage.validate(state.targets)
    if stage.needs is None:
        for t in state.targets.values():
            stage.compress(t, None)
    else:
        calibrate_and_compress(state.model, state.targets, batches, stage, Calibration(true_sequential=true_sequential))
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

    calibrate_and_compress(model, targets, token_batches(2), Spy(), Calibration(true_sequential=True))
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
    calibrate_and_compress(model, targets, batches, rec)
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
        calibrate_and_compress(model, targets, batches, rec, Calibration(true_sequential=ts))
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
        calibrate_and_compress(model, find_targets(model), [torch.randn(2, 4)], GPTQ(4, name="gptq"))


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
    import compress_order.stages.calibration as calibration

    model = tiny_vit()
    targets = vit_targets(model)
    with caplog.at_level("INFO", logger="compress_order"):
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
    calibrate_and_compress(model, targets, batches, rec)
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
