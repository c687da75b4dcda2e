"""The paper's other methods (issue #39): a Hadamard rotation of the residual stream (QuaRot's transform) and block
removal (SLEB), each order-safe: the rotation keeps the function on every family it supports and refuses the
others; removed blocks are really gone (config, forward, KV cache, saved checkpoint) and come back for siblings."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import FAMILIES, MOE_FAMILIES, family_config, moe_config, run

from compress_order.core.errors import UserError
from compress_order.modeling.blocks import find_blocks
from compress_order.modeling.targets import ModelState, find_targets
from compress_order.numerics.hadamard import hadamard, hadamard_orders, random_orthogonal, randomized_hadamard
from compress_order.stages.rotate import Rotate
from compress_order.stages.sleb import Sleb

SUPPORTED = ["LLaMA", "Mistral", "Qwen2", "Phi-3", *MOE_FAMILIES]
REFUSED = {
    "OPT": "no final norm found",
    "GPT-2": "its norms: LayerNorm",
    "GPT-NeoX": "no final norm found",
    "Falcon": "its norms: LayerNorm",
    "Gemma2": "norms after a sublayer scale what it writes per channel",
}


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 576, 640, 896])
def test_hadamard_matrices_are_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # every input spread evenly over all outputs
    q = randomized_hadamard(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_sizes_without_a_known_hadamard_matrix_are_refused_and_random_rotations_cover_them():
    assert hadamard_orders(52) is None and hadamard_orders(6) is None
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        hadamard(52)
    q = random_orthogonal(52, seed=0)
    assert torch.allclose(q @ q.T, torch.eye(52, dtype=torch.float64), atol=1e-12)
    assert not torch.equal(randomized_hadamard(64, 0), randomized_hadamard(64, 1))  # the seed draws the signs


def _tiny(family: str, tied: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config(family, 40) if family in FAMILIES else moe_config(family, 40)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config).eval()
    # float64 where the kernels allow (grouped expert matmuls take float32 at most): the check is then ~1e-12
    return model.double() if family in FAMILIES else model


@pytest.mark.parametrize("heads", [False, True], ids=["stream", "stream+heads"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_rotation_keeps_the_function_of_every_supported_family(family, heads):
    model = _tiny(family)
    state = ModelState(model, find_targets(model, ["lm_head"]), whole=True)
    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    snap = state.snapshot()
    stage = Rotate(name="rotate", heads=heads)
    if heads and family == "DeepSeek-V3":  # multi-head latent attention has no value heads to rotate
        with pytest.raises(UserError, match="heads=true needs a v_proj or qkv_proj"):
            stage.validate_model(state)
        return
    stage.validate_model(state)
    stage.compress_model(state, None)
    embed = model.get_input_embeddings().weight
    assert not torch.allclose(embed, snap["param:model.embed_tokens.weight"][0].to(embed.dtype))  # really rotated
    with torch.no_grad():
        after = model(ids).logits
    tol = 1e-6 if family in FAMILIES else 2e-5  # the norms compute in float32 whatever the weights
    assert (after - before).abs().max() <= tol * before.abs().max()
    state.restore(snap)  # a sibling order starts from the unrotated weights
    assert state.equal(snap)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("family", REFUSED)
def test_families_whose_stream_cannot_be_rotated_are_refused_in_one_line(family):
    model = _tiny(family)
    state = ModelState(model, find_targets(model, ["lm_head"]))
    with pytest.raises(UserError, match=REFUSED[family]) as e:
        Rotate(name="rotate").validate_model(state)
    assert "\n" not in str(e.value) and "supported: LLaMA" in str(e.value)


def test_tied_embeddings_are_untied_by_the_rotation_and_tied_again_on_restore():
    model = _tiny("LLaMA", tied=True)
    state = ModelState(model, find_targets(model, ["lm_head"]), whole=True)
    assert state.tied()
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    snap = state.snapshot()
    stage = Rotate(name="rotate")
    stage.compress_model(state, None)
    assert not state.tied() and model.config.tie_word_embeddings is False  # the final norm folded into lm_head only
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-6)
    after = state.snapshot()
    state.restore(snap)
    assert state.tied() and model.config.tie_word_embeddings is True and state.equal(snap)
    state.restore(after)  # and forward again (a state cache reload)
    assert not state.tied() and state.equal(after)


def test_rotation_after_a_pruner_or_quantizer_is_infeasible_and_after_expert_removal_feasible():
    from compress_order.numerics.formats import fit_weight_grid

    model = _tiny("Mixtral")
    targets = find_targets(model, ["lm_head"])
    stage = Rotate(name="rotate")
    assert stage.feasible(targets) is None
    expert = next(t for t in targets.values() if t.index is not None)
    expert.constraint.mask = torch.zeros(expert.shape, dtype=torch.bool)
    expert.constraint.dropped = True  # a removed expert: stays removed (zeros rotate to zeros)
    assert stage.feasible(targets) is None
    q = targets["model.layers.0.self_attn.q_proj"]
    q.constraint.grid = fit_weight_grid(q.weight, "int", 4, 16, True)
    q.constraint.applied.append("gptq")
    why = stage.feasible(targets)
    assert why is not None and "rotate after gptq" in why and "model.layers.0.self_attn.q_proj" in why


def _blocks(model):
    return find_blocks(model, find_targets(model, ["lm_head"]))[1]


@pytest.mark.parametrize("family", ["LLaMA", "Qwen2", "Qwen2-MoE"])
def test_removed_blocks_are_gone_from_the_model_and_come_back_on_restore(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny(family).float()
    config = model.config
    n = config.num_hidden_layers
    state = ModelState(model, find_targets(model, ["lm_head"]))
    snap = state.snapshot()
    blocks = _blocks(model)
    dropped_block = blocks[1]
    ids = torch.randint(0, 40, (1, 12))
    state.remove_blocks(blocks, [1], "sleb")
    assert len(blocks) == n - 1 and config.num_hidden_layers == n - 1
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == n - 1
    assert all(m.layer_idx == i for i, b in enumerate(blocks) for m in b.modules() if hasattr(m, "layer_idx"))
    gone = [t for t in state.targets.values() if t.constraint.dropped]
    assert gone and all(not t.weight.any() for t in gone)
    state.check()
    with torch.no_grad():  # the forward and KV-cache decoding run on the blocks left
        short = model(ids).logits
        model.generate(ids, max_new_tokens=3, do_sample=False)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.num_hidden_layers == n - 1
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, short, atol=1e-5)
    state.restore(snap)
    assert len(blocks) == n and blocks[1] is dropped_block and config.num_hidden_layers == n
    assert not any(t.constraint.dropped for t in state.targets.values()) and state.equal(snap)


def test_sleb_removes_the_block_whose_removal_costs_least():
    model = _tiny("LLaMA").float()
    blocks = _blocks(model)
    with torch.no_grad():  # block 1 adds nothing to the residual stream: removing it changes nothing
        blocks[1].self_attn.o_proj.weight.zero_()
        blocks[1].mlp.down_proj.weight.zero_()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    batches = [torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    Sleb(name="sleb", blocks=1).compress_model(state, batches)
    assert state.blocks.removed == (1,)
    assert Sleb(name="sleb", blocks=0.5).count(4) == 2 and Sleb(name="sleb", blocks=0.01).count(4) == 1


def test_rotation_and_block_removal_in_every_order_through_the_runner(tmp_path):
    """The miniature on the embedded char-LLaMA: rotation keeps dense perplexity, orders that rotate compressed
    layers are reported infeasible, SLEB's rows count what it removed, every saved order reloads."""
    from compress_order.config.compose import compose_config

    cfg = compose_config([
        "experiment=mini_rotation", "stages=[rotate,gptq,{name:sleb,blocks:1}]", "eval.max_windows=2",
        "calibration.nsamples=2", "calibration.seqlen=64", "eval.latency.repeats=1", "eval.latency.warmup=0",
        "threads=1", "save=true", f"store_dir={tmp_path / 'store'}",
    ])  # fmt: skip
    df = run(cfg, tmp_path / "run")
    ok = df[df["status"] == "ok"]
    ppl = ok[ok["metric"] == "perplexity"].set_index("order")["value"]
    assert math.isclose(ppl["rotate"], ppl["dense"], rel_tol=1e-4)  # the function is kept
    infeasible = set(df[df["status"] == "infeasible"]["order"])
    assert infeasible == {
        "gptq > rotate", "gptq > rotate > sleb(blocks=1)", "gptq > sleb(blocks=1) > rotate",
        "sleb(blocks=1) > gptq > rotate",
    }  # fmt: skip
    assert "sleb(blocks=1) > rotate > gptq" in set(ppl.index)  # rotation after block removal is feasible
    removed = ok[ok["metric"] == "blocks_removed"].set_index("order")["value"]
    assert set(removed.index) == {o for o in ppl.index if "sleb" in o} and (removed == 1).all()
    sparsity = ok[ok["metric"] == "sparsity"].set_index("order")["value"]
    assert math.isclose(sparsity["sleb(blocks=1)"], 1 / 6, rel_tol=1e-6)  # one block of six: its weights count
    size = ok[ok["metric"] == "size_bytes"].set_index("order")["value"]
    assert size["sleb(blocks=1)"] < size["dense"]
    saved = sorted((tmp_path / "run" / "models").iterdir())
    assert len(saved) == 3
    from transformers import AutoModelForCausalLM

    for folder in saved:
        assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 5



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_left_unrotated_stops_the_run_in_any_dtype(dtype, monkeypatch):
    """The probe compares float32 logits: one reader left out changes them by ~1%, far above rounding, while a
    correct rotation of a bfloat16 model passes and leaves it in bfloat16."""
    import compress_order.stages.rotate as rotate_module

    model = _tiny("LLaMA").to(dtype)
    state = ModelState(model, find_targets(model, ["lm_head"]), whole=True)
    snap = state.snapshot()
    Rotate(name="rotate").compress_model(state, None)
    assert model.get_input_embeddings().weight.dtype == dtype and model.lm_head.weight.dtype == dtype
    state.restore(snap)
    real = rotate_module.residual_map

    def one_reader_short(*args, **kwargs):
        rmap = real(*args, **kwargs)
        rmap.norms[0][1].pop(1)  # block 0's k_proj keeps reading the unrotated stream
        return rmap

    monkeypatch.setattr(rotate_module, "residual_map", one_reader_short)
    with pytest.raises(UserError, match="its structure is not one rotate knows"):
        Rotate(name="rotate").compress_model(state, None)


def test_online_rotation_of_down_proj_inputs_keeps_the_function_and_is_undone_for_siblings():
    model = _tiny("LLaMA")
    state = ModelState(model, find_targets(model, ["lm_head"]), whole=True)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    snap = state.snapshot()
    Rotate(name="rotate", online=True).compress_model(state, None)
    downs = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    assert state.online is not None and all(getattr(m, "online_rotation", False) for m in downs)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() <= 1e-6 * before.abs().max()
    rotated = state.snapshot()
    state.restore(snap)  # the sibling order: no run-time rotation left behind
    assert state.online is None and not any(m._forward_pre_hooks for m in downs)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    state.restore(rotated)  # and back (a state cache reload)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() <= 1e-6 * before.abs().max()


def test_online_rotation_needs_down_proj_linears():
    model = _tiny("Mixtral")
    state = ModelState(model, find_targets(model, ["lm_head"]), whole=True)
    with pytest.raises(UserError, match="fused experts compute theirs inside"):
        Rotate(name="rotate", online=True).validate_model(state)


def test_a_hidden_size_without_a_hadamard_matrix_is_one_line_naming_it():
    with pytest.raises(UserError, match=r"no Hadamard matrix of order 52 \(the hidden size\).*use matrix=random"):
        Rotate(name="rotate")._rotation(52, 0, "hidden size")
    q = Rotate(name="rotate", matrix="random")._rotation(52, 0, "hidden size")
    assert torch.allclose(q @ q.T, torch.eye(52, dtype=torch.float64), atol=1e-12)
