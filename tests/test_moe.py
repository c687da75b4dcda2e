"""Mixture-of-experts models: every weight matrix is compressed or skipped on purpose (coverage), each expert of a
fused 3-D parameter is a target calibrated on its routed tokens, and expert pruning composes with every stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress_order.modeling.coverage import check_coverage, load_targets, weight_matrices
from compress_order.core.errors import UserError
from compress_order.modeling.targets import ModelState, find_targets
from helpers import exit_code as _rc
from helpers import save_tiny_moe

ROUTERS = r"\.(gate|router|shared_expert_gate)$"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return save_tiny_moe("Mixtral", tmp_path_factory.mktemp("mixtral") / "ckpt")


@pytest.fixture
def moe_overrides(mixtral, tiny_text, tmp_path) -> list[str]:
    return [
        f"model.path={mixtral}", "model.name=tiny-mixtral", "model.seqlen=64", "model.dtype=float32",
        f"data.train={tiny_text['train']}", f"data.valid={tiny_text['valid']}", "data.name=tiny",
        "calibration.nsamples=4", "calibration.seqlen=32", "eval.max_windows=2", "eval.backends=none",
        "eval.latency.repeats=1", "eval.latency.warmup=0", "device=cpu", "threads=1", "group_size=32",
        f"store_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip


def _load(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _run(overrides: list[str], out: Path):
    from compress_order.config.compose import compose_config
    from helpers import run

    return run(compose_config(overrides), out)


# ------------------------------------------------------------------------------------------------- coverage


class _Mystery(nn.Module):
    """A layer type no adapter knows: a 3-D weight used through einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,kij->bj", x, self.table)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.pos = nn.Parameter(torch.zeros(1, 8, 16))  # additive: an embedding, not a weight matrix
        self.fc = nn.Linear(16, 16)
        self.odd = _Mystery()
        self.head = nn.Linear(16, 10)


def test_a_weight_matrix_no_adapter_handles_stops_with_its_name_share_and_how_to_skip():
    net = _Net()
    with pytest.raises(UserError) as e:
        load_targets(net, ["head"])
    msg = str(e.value)
    assert "\n" not in msg and "odd.table (_Mystery)" in msg and "model.skip" in msg
    share = 4 * 16 * 16 / (4 * 16 * 16 + 16 * 16 + 16 * 10)
    assert f"_Mystery {share:.1%}" in msg
    targets, cov = load_targets(net, ["head", r"\.table$"])  # skipped on purpose: listed, not an error
    assert set(targets) == {"fc"}
    assert {m.name for m in cov.skipped} == {"head", "odd.table"}
    assert "left dense by model.skip" in cov.line() and "_Mystery" in cov.line()
    assert {m.name for m in weight_matrices(net)} == {"fc", "odd.table", "head"}  # no embedding, no bias


def test_every_expert_is_a_target_and_only_the_router_and_head_are_left_dense(mixtral):
    model = _load(mixtral)
    targets, cov = load_targets(model, ["lm_head", ROUTERS])
    experts = [n for n, t in targets.items() if t.index is not None]
    assert len(experts) == 2 * 4 * 2  # 2 layers × 4 experts × (gate_up, down)
    assert "model.layers.1.mlp.experts.3.down_proj" in targets
    assert sorted({m.owner for m in cov.skipped}) == ["Linear", "MixtralTopKRouter"]
    # With only lm_head skipped the routers are uncovered: the run would stop, naming them.
    with pytest.raises(UserError, match="MixtralTopKRouter"):
        check_coverage(model, find_targets(model, ["lm_head"]), ["lm_head"])


def test_an_uncovered_router_stops_the_run_before_any_node(moe_overrides, tmp_path, capsys):
    rc = _rc(["run", *moe_overrides, "model.skip=[lm_head]", "stages=[rtn]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "MixtralTopKRouter" in err[0] and "model.skip" in err[0], err
    assert not (tmp_path / "run" / "results.parquet").exists() and not list((tmp_path / "store").rglob("*.json"))


# --------------------------------------------------------------------------------------- experts as targets


@pytest.mark.parametrize("family", ["Mixtral", "GPT-OSS"])
def test_an_expert_target_is_a_view_of_its_slice_and_snapshots_restore_it(family, tmp_path):
    model = _load(save_tiny_moe(family, tmp_path / family))
    targets = find_targets(model, ["lm_head", ROUTERS])
    experts = model.model.layers[0].mlp.experts
    t = targets["model.layers.0.mlp.experts.2.down_proj"]
    stored = experts.down_proj[2]
    want = stored.t() if experts.is_transposed else stored  # (out, in) = (hidden, intermediate)
    assert t.shape == (64, 64) and torch.equal(t.weight, want)
    state = ModelState(model, targets)
    snap = state.snapshot()
    before = experts.down_proj.detach().clone()
    t.set_weight(torch.zeros(t.shape))
    assert bool((experts.down_proj[2] == 0).all())
    others = [e for e in range(4) if e != 2]
    assert torch.equal(experts.down_proj[others], before[others])  # only its own slice was written
    state.restore(snap)
    assert state.equal(snap) and torch.equal(experts.down_proj, before)


# ---------------------------------------------------------------------------------- calibration on routed tokens


def _layer0(path: Path):
    """The model, its targets, layer 0's MoE block and its ExpertUnit, a batch, and the block's input rows for it
    (after post_attention_layernorm, captured by a hook)."""
    from compress_order.modeling.moe import expert_units

    model = _load(path)
    targets = find_targets(model, ["lm_head", ROUTERS])
    layer = model.model.layers[0].mlp
    (unit,) = [u for u in expert_units(list(targets.values())) if u.module is layer.experts]
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return model, targets, layer, unit, ids, seen[0].reshape(-1, seen[0].shape[-1])


def test_each_expert_hessian_comes_from_the_tokens_routed_to_it(mixtral):
    from compress_order.modeling.hessian import HessianStats

    model, targets, layer, unit, ids, x = _layer0(mixtral)
    top = torch.topk(F.softmax(x @ layer.gate.weight.t(), dim=-1), 2, dim=-1).indices  # the router, by hand
    for all_experts in (False, True):
        stats, handle = unit.collect(["gate_up_proj", "down_proj"], lambda t: HessianStats(t), all_experts)
        with torch.no_grad():
            model(ids)
        handle.remove()
        for e in range(4):
            xe = x if all_experts else x[(top == e).any(-1)]
            assert unit.tokens[e] == int((top == e).any(-1).sum())
            gu = stats[id(targets[f"model.layers.0.mlp.experts.{e}.gate_up_proj"])]
            assert gu.n == xe.shape[0]
            torch.testing.assert_close(gu.H, 2 / xe.shape[0] * xe.t() @ xe, rtol=1e-4, atol=1e-6)
            gate, up = (xe @ layer.experts.gate_up_proj[e].t()).chunk(2, dim=-1)
            inter = F.silu(gate) * up  # Mixtral's SwiGLU, written out
            down = stats[id(targets[f"model.layers.0.mlp.experts.{e}.down_proj"])]
            torch.testing.assert_close(down.H, 2 / xe.shape[0] * inter.t() @ inter, rtol=1e-4, atol=1e-6)
    assert sum(unit.tokens) == 2 * x.shape[0]  # top-2: every token reaches two experts


def test_an_expert_without_tokens_is_compressed_data_free_and_said(mixtral, caplog):
    import logging

    from compress_order.stages.calibration import calibrate_and_compress
    from compress_order.modeling.moe import mask_router
    from compress_order.stages.gptq import GPTQ

    model = _load(mixtral)
    targets = find_targets(model, ["lm_head", ROUTERS])
    for layer in model.model.layers:  # the router never picks expert 3 (its weights stay a target)
        mask_router(layer.mlp.gate, lambda: torch.tensor([False, False, False, True]))
    batches = [torch.randint(0, model.config.vocab_size, (1, 32)) for _ in range(3)]
    report: dict = {}
    with caplog.at_level(logging.INFO, logger="compress_order"):
        calibrate_and_compress(model, targets, batches, GPTQ(4, group_size=32, name="gptq"), report=report)
    ModelState(model, targets).check()
    assert report["model.layers.0.mlp.experts"]["without_tokens"] == 1
    assert report["model.layers.0.mlp.experts"]["min"] == 0
    assert any("1 expert(s) got none and are compressed data-free" in r.getMessage() for r in caplog.records)
    w = targets["model.layers.0.mlp.experts.3.gate_up_proj"].weight
    assert torch.isfinite(w).all() and targets["model.layers.0.mlp.experts.3.gate_up_proj"].constraint.grid is not None


# ------------------------------------------------------------------------------------------------ end to end


def test_sparsegpt_then_gptq_compresses_the_experts_the_row_claims(moe_overrides, tmp_path):
    """The bug this guards: experts left dense while the row said 50% sparse, 3.6 bits."""
    df = _run([*moe_overrides, "stages=[sparsegpt,gptq]", "bits=4", "sparsity=0.5", "save=true"], tmp_path / "out")
    sim = df[df.backend == "dense-simulated"]
    cov = sim[sim.metric == "coverage"].set_index("order")["value"]
    assert cov["dense"] == 0 and cov["sparsegpt > gptq"] == 1 and cov["gptq > sparsegpt"] == 1
    size = sim[sim.metric == "size_bytes"].set_index("order")["value"]
    assert size["sparsegpt > gptq"] < 0.35 * size["dense"]  # experts are 82% of the weights: they shrank too
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "coverage: 100.0% of the" in summary and "MixtralTopKRouter" in summary
    saved = _load(tmp_path / "out" / "models" / "sparsegpt_then_gptq")
    for layer in saved.model.layers:
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            for e in range(p.shape[0]):
                w = p[e].detach()
                assert float((w == 0).float().mean()) >= 0.5 - 1e-9
                groups = w.reshape(w.shape[0], -1, 32)
                assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 16


def test_expert_tokens_per_layer_are_in_run_stats(moe_overrides, tmp_path):
    import json

    _run([*moe_overrides, "stages=[gptq]", "bits=4", "calibration.nsamples=8"], tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "run_stats.json").read_text())
    tokens = stats["expert_tokens"]["gptq"]
    assert set(tokens) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    layer0 = tokens["model.layers.0.mlp.experts"]
    assert layer0["experts"] == 4 and layer0["min"] <= layer0["median"] <= layer0["max"]
    assert 2 * 8 * 32 == pytest.approx(4 * layer0["median"], rel=1.0)  # 8 segments × 32 tokens × top-2 over 4


# ---------------------------------------------------------------------------------------------- expert pruning


def _routed_counts(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, how often each expert is picked, read off the experts' own calls."""
    counts = []

    def hook(m, args):
        counts.append(torch.bincount(args[1].flatten(), minlength=m.num_experts))

    hs = [layer.mlp.experts.register_forward_pre_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    return counts


def test_expert_prune_removes_the_least_routed_and_the_router_never_picks_them(mixtral):
    from compress_order.stages.calibration import calibrate_and_compress
    from compress_order.stages.expert_prune import ExpertPrune

    model = _load(mixtral)
    targets = find_targets(model, ["lm_head", ROUTERS])
    batches = [torch.randint(0, model.config.vocab_size, (1, 32)) for _ in range(4)]
    before = _routed_counts(model, torch.cat(batches, 1))[0]  # layer 0 sees the same inputs before and after
    calibrate_and_compress(model, targets, batches, ExpertPrune(0.5, name="ep"))
    ModelState(model, targets).check()
    gone0 = {t.index for n, t in targets.items() if n.startswith("model.layers.0.") and t.constraint.dropped}
    assert gone0 == set(torch.argsort(before, stable=True)[:2].tolist())
    for layer_counts, layer in zip(_routed_counts(model, torch.cat(batches, 1)), model.model.layers):
        dropped = {t.index for t in targets.values() if t.module is layer.mlp.experts and t.constraint.dropped}
        assert len(dropped) == 2 and all(int(layer_counts[e]) == 0 for e in dropped)
        for e in dropped:
            assert bool((layer.mlp.experts.gate_up_proj[e] == 0).all())


def test_grouped_sigmoid_routing_loses_as_many_experts_per_group_and_matches_the_sliced_checkpoint(tmp_path):
    """DeepSeek-V3 picks experts by sigmoid score + correction bias inside the best groups (by their top two):
    removing experts by masking must give what the checkpoint without them computes, bias and groups included."""
    from compress_order.stages.calibration import calibrate_and_compress
    from compress_order.modeling.moe import without_removed_experts
    from compress_order.stages.expert_prune import ExpertPrune

    model = _load(save_tiny_moe("DeepSeek-V3", tmp_path / "ds"))  # 8 experts in 2 groups, top-1 group, top-2
    gate = model.model.layers[1].mlp.gate
    torch.manual_seed(1)
    with torch.no_grad():  # a trained model's bias is not zero; make it decide choices here
        gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
        gate.weight.normal_(0, 0.5)
    targets = find_targets(model, ["lm_head", ROUTERS])
    batches = [torch.randint(0, model.config.vocab_size, (1, 32)) for _ in range(4)]
    calibrate_and_compress(model, targets, batches, ExpertPrune(0.5, criterion="reap", name="ep"))
    ModelState(model, targets).check()
    gone = sorted({t.index for t in targets.values() if t.index is not None and t.constraint.dropped})
    assert [sum(e < 4 for e in gone), sum(e >= 4 for e in gone)] == [2, 2]  # two from each group
    ids = torch.cat(batches, 1)
    chosen = []
    hook = model.model.layers[1].mlp.experts.register_forward_pre_hook(lambda m, a: chosen.append(a[1]))
    with torch.no_grad():
        masked = model(ids).logits
        with without_removed_experts(model, targets):
            assert gate.weight.shape[0] == 4 and gate.e_score_correction_bias.shape == (4,)
            sliced = model(ids).logits
    hook.remove()
    assert not any(bool((chosen[0] == e).any()) for e in gone)  # the masked router never picks a removed expert
    assert torch.allclose(masked, sliced, atol=1e-5, rtol=1e-5)


def test_reap_scores_are_router_weighted_mean_output_norms(mixtral):
    from compress_order.modeling.moe import collect_routing

    model, targets, layer, unit, ids, x = _layer0(mixtral)
    probs = F.softmax(x @ layer.gate.weight.t(), dim=-1)
    val, top = torch.topk(probs, 2, dim=-1)
    val = val / val.sum(-1, keepdim=True)  # Mixtral renormalises its top-k
    routing, handle = collect_routing(unit)
    with torch.no_grad():
        model(ids)
    handle.remove()
    for e in range(4):
        rows = (top == e).any(-1)
        g = (val * (top == e)).sum(-1)[rows].detach()  # the reference needs no graph
        gate, up = (x[rows] @ layer.experts.gate_up_proj[e].t()).chunk(2, dim=-1)
        out = ((F.silu(gate) * up) @ layer.experts.down_proj[e].t()).detach()
        assert float(routing.tokens[e]) == int(rows.sum())
        assert float(routing.reap()[e]) == pytest.approx(float((g * out.norm(dim=-1)).mean()), rel=1e-4)


@pytest.mark.parametrize("order", ["[expert_prune,gptq]", "[gptq,expert_prune]", "[expert_prune,magnitude]"])
def test_expert_prune_composes_and_its_checkpoint_has_fewer_experts(order, moe_overrides, tmp_path):
    import json

    out = tmp_path / "out"
    df = _run([*moe_overrides, f"stages={order}", "bits=4", "sparsity=0.5", "expert_sparsity=0.5", "save=true"], out)
    sim = df[(df.backend == "dense-simulated") & (df.status == "ok")]
    first = order.strip("[]").replace(",", " > ")
    ppl = sim[sim.metric == "perplexity"].set_index("order")["value"]
    assert all(math.isfinite(v) for v in ppl)
    assert sim[sim.metric == "coverage"].set_index("order")["value"][first] == 1
    (folder,) = [p for p in (out / "models").iterdir()
                 if json.loads((p / "compression.json").read_text())["label"] == first]  # fmt: skip
    if order == "[expert_prune,gptq]":  # gptq calibrates the experts left, each of which gets tokens
        tokens = json.loads((out / "run_stats.json").read_text())["expert_tokens"]["expert_prune > gptq"]
        assert all(t["experts"] == 2 and t["without_tokens"] == 0 for t in tokens.values()), tokens
    # removed experts are a new shape: the dense model and the nodes that removed experts are timed apart
    assert json.loads((out / "run_stats.json").read_text())["latency_timings"] == 2
    saved = _load(folder)
    assert saved.config.num_local_experts == 2
    for layer in saved.model.layers:
        assert layer.mlp.gate.weight.shape == (2, 64) and layer.mlp.experts.gate_up_proj.shape[0] == 2
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            if "magnitude" in order:  # a later pruner's quota counts the experts left
                assert all(float((p[e] == 0).float().mean()) == pytest.approx(0.5, abs=0.01) for e in range(2))
            else:
                assert all(len(torch.unique(g)) <= 16 for e in range(2) for g in p[e].reshape(-1, 32))
    # The saved checkpoint evaluates to the node's perplexity: removed experts were never routed to.
    df2 = _run([*[o for o in moe_overrides if not o.startswith(("model.path", "store_dir", "hydra.run"))],
                f"model.path={folder}", f"store_dir={tmp_path / 'store2'}", f"hydra.run.dir={tmp_path / 'run2'}",
                "stages=[magnitude]"], tmp_path / "out2")  # fmt: skip
    reloaded = df2[(df2.metric == "perplexity") & (df2.order == "dense")]["value"].iloc[0]
    assert reloaded == pytest.approx(ppl[first], rel=1e-5)


BAD_MOE = [
    # the root key is checked with the config, so the error names the key given (the stage's own check says
    # "expert_prune expert_sparsity=..." for a value set in its entry)
    (["stages=[expert_prune]", "expert_sparsity=1.0"], "error: expert_sparsity=1.0 is outside [0, 1)"),
    (["stages=[{name:expert_prune,expert_sparsity:1.0}]"], "expert_prune expert_sparsity=1.0 is outside [0, 1)"),
    (["stages=[expert_prune]", "expert_sparsity=0.75"], "leaves 1 of 4 experts in model.layers.0.mlp.experts, "
                                                        "fewer than the router's top-k=2 (the largest "
                                                        "expert_sparsity that works here is 0.5)"),
    (["stages=[expert_prune]", "expert_sparsity=abc"], "error: expert_sparsity=abc is not a number; valid: [0, 1)"),
    (["stages=[{name:expert_prune,criterion:size}]"], "expert_prune criterion=size is unknown; valid: frequency, reap"),
]
# a router in groups (DeepSeek-V3: 8 experts, 2 groups of 4, one group per token, top-2)
BAD_GROUPED = [
    ("0.75", "leaves 1 of the 4 experts of each of the 2 router groups in model.layers.1.mlp.experts; a group needs 2"
             " for its score (the largest expert_sparsity that works here is 0.5)"),
]


@pytest.mark.parametrize("sparsity,message", BAD_GROUPED)
def test_expert_prune_that_would_empty_a_router_group_exits_2(sparsity, message, moe_overrides, tmp_path, capsys):
    ckpt = save_tiny_moe("DeepSeek-V3", tmp_path / "ds")
    capsys.readouterr()  # save_pretrained's progress bar is the test's own output, not the command's
    args = [o for o in moe_overrides if not o.startswith("model.path")] + [f"model.path={ckpt}"]
    rc = _rc(["run", *args, "stages=[expert_prune]", f"expert_sparsity={sparsity}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args,message", BAD_MOE, ids=[" ".join(a) for a, _ in BAD_MOE])
def test_bad_expert_prune_settings_exit_2_before_any_node(args, message, moe_overrides, tmp_path, capsys):
    rc = _rc(["run", *moe_overrides, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "results.parquet").exists() and not list((tmp_path / "store").rglob("*.json"))


def test_expert_prune_on_a_dense_model_exits_2_before_any_node(tiny_overrides, tmp_path, capsys):
    rc = _rc(["run", *tiny_overrides, "stages=[expert_prune,rtn]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no MoE layer" in err[0], err
    assert not list((tmp_path / "store").rglob("*.json"))


def test_a_dense_checkpoint_reloads_every_expert_bit_for_bit(mixtral, tmp_path):
    from compress_order.stages.calibration import calibrate_and_compress
    from compress_order.export.checkpoint import save_model
    from compress_order.loaders.models import LoadedModel
    from compress_order.stages.gptq import GPTQ

    model = _load(mixtral)
    targets = find_targets(model, ["lm_head", ROUTERS])
    batches = [torch.randint(0, model.config.vocab_size, (1, 32)) for _ in range(2)]
    calibrate_and_compress(model, targets, batches, GPTQ(3, group_size=32, sym=False, name="gptq"))
    dest = save_model(LoadedModel(model, "causal_lm", "tiny"), targets, ("gptq",), tmp_path / "gptq", fmt="dense")
    reloaded = _load(dest).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded[name], value), name


def test_static_activation_quantization_of_experts_is_refused_before_any_node(moe_overrides, tmp_path, capsys):
    rc = _rc(["run", *moe_overrides, "stages=[rtn]", "bits=8", "act_bits=8", "act_granularity=static"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "fused MoE experts (MixtralExperts) take dynamic scales only" in err[0], err
    assert not list((tmp_path / "store").rglob("*.json"))
