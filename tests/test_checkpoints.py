"""Copy-on-write checkpoints of the order trie: bit-exact restores for every sibling, and copies well under the
model's bytes (packed masks, kept entries of pruned weights, codes of quantized ones)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress_order.modeling.targets import ModelState, WeightCopy, find_targets
from compress_order.numerics.bits import fingerprint, pack_bits, raw_bits, unpack_bits
from compress_order.run.pipeline import apply_stage
from compress_order.run.trie import build_trie, run_trie
from compress_order.stages.magnitude import Magnitude
from compress_order.stages.rtn import RTN


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


STAGES = {
    "magnitude": Magnitude(sparsity=0.7, name="magnitude"),
    "rtn": RTN(bits=3, group_size=16, name="rtn"),
    "m2": Magnitude(sparsity=0.3, name="magnitude", label="m2"),
}


def _state_of(state: ModelState) -> dict:
    """Every target's raw weight bits and constraint, and the 1-D parameters: what a node must hold exactly."""
    out = {}
    for n, t in state.targets.items():
        c = t.constraint
        grid = None if c.grid is None else (c.grid.scale.clone(), c.grid.zero.clone())
        out[n] = (raw_bits(t.weight).clone(), None if c.mask is None else c.mask.clone(), grid, list(c.applied))
    for n, p in state.params().items():
        out["param:" + n] = raw_bits(p.data).clone()
    return out


def _same(a: dict, b: dict) -> bool:
    def eq(x, y) -> bool:
        if isinstance(x, tuple | list):
            return isinstance(y, tuple | list) and len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y))
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        return x == y

    return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)


def test_packed_bits_round_trip_any_length():
    for n in (1, 7, 8, 9, 1000):
        mask = torch.rand(n) < 0.4
        bits = pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
        assert torch.equal(unpack_bits(bits, (n,), "cpu"), mask)
    mask = torch.rand(6, 10) < 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), (6, 10), "cpu"), mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_fingerprint_sees_one_changed_entry_and_two_swapped(dtype):
    w = torch.randn(6, 10).to(dtype)
    same = fingerprint(w.clone())
    assert torch.equal(fingerprint(w), same)
    for edit in (
        lambda v: v.__setitem__((2, 3), -v[2, 3]),  # a sign
        lambda v: v.__setitem__((0, 0), torch.tensor(-0.0, dtype=dtype)),  # -0.0 for a value
        lambda v: v.__setitem__((1, slice(None)), v[1].flip(0)),  # entries of a row swapped
        lambda v: v.__setitem__((slice(None), 4), v[:, 4].flip(0)),  # entries of a column swapped
    ):
        v = w.clone()
        edit(v)
        assert not torch.equal(fingerprint(v), same)


def test_weight_copies_are_bit_exact_and_small():
    model = _llama()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    t = state.targets["model.layers.0.mlp.up_proj"]
    n, dense = t.weight.numel(), t.weight.numel() * 2
    copy = WeightCopy.of(t.weight, t.constraint, "cpu")
    assert copy.whole is not None and copy.nbytes() == dense  # nothing to exploit in a dense weight
    STAGES["magnitude"].compress(t)
    w = t.weight
    assert bool(((w == 0) & torch.signbit(w)).any())  # pruning leaves -0.0 entries: a copy must keep their sign
    copy = WeightCopy.of(w, t.constraint, "cpu")
    assert copy.values is not None and torch.equal(raw_bits(copy.weight("cpu")), raw_bits(w))
    assert copy.nbytes() <= 0.3 * dense + n // 4 + 2  # kept entries, mask and sign bits
    STAGES["rtn"].compress(t)  # pruned and quantized, groups of 16: the kept entries still beat codes and scales
    copy = WeightCopy.of(t.weight, t.constraint, "cpu")
    assert torch.equal(raw_bits(copy.weight("cpu")), raw_bits(t.weight)) and copy.nbytes() <= 0.3 * dense + n // 4 + 2
    p = state.targets["model.layers.0.mlp.down_proj"]
    STAGES["magnitude"].compress(p)
    RTN(bits=4, group_size=64, name="rtn").compress(p)  # groups of 64: the kept entries' codes, two to a byte
    copy = WeightCopy.of(p.weight, p.constraint, "cpu")
    assert copy.codes is not None and copy.keep is not None and copy.count == int(p.constraint.mask.sum())
    assert torch.equal(raw_bits(copy.weight("cpu")), raw_bits(p.weight)) and copy.nbytes() <= 0.15 * n + n // 4 + 2
    q = state.targets["model.layers.1.mlp.up_proj"]
    STAGES["rtn"].compress(q)  # quantized only: every code, two to a byte
    copy = WeightCopy.of(q.weight, q.constraint, "cpu")
    assert copy.codes is not None and copy.keep is None and copy.nbytes() <= n // 2 + n // 8 + 2
    assert torch.equal(raw_bits(copy.weight("cpu")), raw_bits(q.weight))
    q.constraint.grid = replace(q.constraint.grid, bits=8)  # 8-bit codes (the same values): one to a byte
    copy = WeightCopy.of(q.weight, q.constraint, "cpu")
    assert copy.codes is not None and copy.codes.numel() == n
    assert torch.equal(raw_bits(copy.weight("cpu")), raw_bits(q.weight))


def _walk(state: ModelState, full: bool) -> tuple[dict, list[dict]]:
    """Each node's state over the 3-stage trie: with the trie's checkpoints, or (reference) with standalone full
    snapshots at every node with several children, as the walk did before checkpoints."""
    seen: dict[tuple, dict] = {}
    sizes: list[dict] = []  # before each application: the open checkpoints' bytes, by the node they were taken at

    def apply(node):
        sizes.append({getattr(ck, "order", None): ck.nbytes() for ck in state._open})
        assert apply_stage(STAGES[node.stage], state, None, None) is None  # type: ignore[arg-type]

    def visit(node):  # a checkpoint the walk takes next is taken at this node
        seen[node.order] = _state_of(state)
        last[0] = node.order

    last: list[tuple] = [()]

    def tagged():
        ck = ModelState.checkpoint(state)
        ck.order = last[0]
        return ck

    state.checkpoint = (lambda: _Full(state)) if full else tagged  # type: ignore[method-assign]
    try:
        run_trie(build_trie(list(STAGES)), state, apply, visit)
    finally:
        del state.checkpoint
    return seen, sizes


class _Full(dict):
    """A full snapshot that the trie can close."""

    def __init__(self, state: ModelState):
        super().__init__(state.snapshot())

    def close(self) -> None:
        self.clear()


def test_every_sibling_restores_bit_exactly_from_copy_on_write_checkpoints():
    model = _llama()
    ref, _ = _walk(ModelState(model, find_targets(model, ["lm_head"])), full=True)
    model = _llama()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    seen, sizes = _walk(state, full=False)
    assert len(seen) == 16 and seen.keys() == ref.keys()
    for order in ref:
        assert _same(seen[order], ref[order]), order
    assert not state._open and all(t.before_write is None for t in state.targets.values())  # all closed
    # the root holds the dense weights whole; a node pruned to 70% only its kept entries and bits, a 3-bit one
    # its codes, one pruned to 30% its codes (they beat its 70% kept entries): copies well under the weights' bytes
    dense = sum(t.weight.numel() * 2 for t in state.targets.values())
    largest: dict = {}
    for held in sizes:
        for order, size in held.items():
            largest[order] = max(largest.get(order, 0), size)
    assert largest[()] <= 1.01 * dense
    assert largest[("magnitude",)] <= 0.5 * dense and largest[("rtn",)] <= 0.6 * dense
    assert largest[("m2",)] <= 0.9 * dense


def test_checkpoints_hold_only_the_weights_written_after_them():
    model = _llama()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    ck = state.checkpoint()
    before = _state_of(state)
    one = state.targets["model.layers.0.self_attn.q_proj"]
    STAGES["magnitude"].compress(one)
    assert set(ck.copies) == {one.name}
    nested = state.checkpoint()
    STAGES["rtn"].compress(one)  # already in the outer checkpoint: only the nested one copies it now
    STAGES["rtn"].compress(state.targets["model.layers.1.mlp.down_proj"])  # unwritten since both: one copy, shared
    assert ck.copies["model.layers.1.mlp.down_proj"] is nested.copies["model.layers.1.mlp.down_proj"]
    assert ck.copies[one.name] is not nested.copies[one.name]
    nested.close()
    state.restore(ck)
    assert _same(_state_of(state), before) and state.equal(ck)
    ck.close()
    with pytest.raises(RuntimeError, match="closed"):
        state.restore(ck)


def test_a_weight_changed_past_set_weight_stops_the_restore():
    model = _llama()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    ck = state.checkpoint()
    state.targets["model.layers.0.mlp.gate_proj"].stored.mul_(2)  # a writer the checkpoint cannot see
    with pytest.raises(RuntimeError, match="without Target.set_weight"):
        state.restore(ck)
    ck.close()


def test_a_checkpoint_refers_to_a_shared_dense_snapshot_instead_of_copying():
    model = _llama()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    dense = state.snapshot()
    state.share(dense)  # the runner's dense weights, kept for several seeds
    ck = state.checkpoint()
    weights = sum(t.weight.numel() * 2 for t in state.targets.values())
    assert set(ck.copies) == set(state.targets) and ck.nbytes() <= 0.1 * weights  # the snapshot's tensors
    assert all(c.stored is dense[n][0] for n, c in ck.copies.items())
    for t in state.targets.values():
        STAGES["magnitude"].compress(t)
    assert set(ck.copies) == set(state.targets)  # nothing copied on write
    nested, pruned = state.checkpoint(), _state_of(state)  # no longer equal to the shared weights
    assert not nested.copies
    up = state.targets["model.layers.0.mlp.up_proj"]
    STAGES["rtn"].compress(up)  # copied on write as a mask over the shared weight (it was pruned, not updated)
    copy = nested.copies[up.name]
    assert copy.stored is dense[up.name][0] and copy.keep is not None and copy.nbytes() <= up.weight.numel() // 4 + 2
    state.restore(nested)
    assert _same(_state_of(state), pruned) and state.equal(nested)
    nested.close()
    state.restore(ck)
    assert state.equal(dense) and state.equal(ck)
    ck.close()


# ---- whole-model stages: block removal and rotation change the structure, and a checkpoint puts it back


class _Calibration:
    """What apply_stage asks of a task: the calibration samples (token ids)."""

    def calibration_batches(self) -> list[torch.Tensor]:
        return [torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(k)) for k in range(2)]


def _qwen2(layers: int = 4) -> torch.nn.Module:
    """A tiny Qwen2 (its config lists a type per layer, which block removal rewrites) in float32."""
    from helpers import family_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config("Qwen2", 40)
    config.num_hidden_layers, config.layer_types = layers, ["full_attention"] * layers
    return AutoModelForCausalLM.from_config(config).float().eval()


def _whole_state_of(state: ModelState) -> dict:
    """`_state_of` and the structure: every parameter's bits, the blocks held and their layer indices, the config's
    per-layer settings, tied embeddings, the run-time rotation (matrix, modules, their hooks) and a forward's
    logits."""
    out = _state_of(state)
    model = state.model
    out |= {"all:" + n: raw_bits(p.data).clone() for n, p in model.named_parameters()}
    cfg = model.config
    out["config"] = (cfg.num_hidden_layers, list(cfg.layer_types or []), cfg.tie_word_embeddings)
    blocks = model.model.layers
    original = tuple(blocks) if state.blocks is None else state.blocks.original
    out["blocks"] = [original.index(b) for b in blocks]  # which of the loaded block modules the model holds
    out["layer_idx"] = [m.layer_idx for b in blocks for m in b.modules() if hasattr(m, "layer_idx")]
    out["kept"] = tuple(range(len(blocks))) if state.blocks is None else state.blocks.kept
    out["tied"] = state.tied()
    out["online"] = None if state.online is None else (state.online[0].clone(), state.online[1])
    out["hooks"] = {n: len(m._forward_pre_hooks) for n, m in model.named_modules() if m._forward_pre_hooks}
    out["marked"] = sorted(n for n, m in model.named_modules() if getattr(m, "online_rotation", False))
    with torch.no_grad():
        out["logits"] = raw_bits(model(torch.arange(12)[None] % 40).logits).clone()
    return out


def test_a_checkpoint_puts_removed_blocks_back_as_a_snapshot_does():
    from compress_order.stages.sleb import Sleb

    model = _qwen2()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    STAGES["magnitude"].compress(state.targets["model.layers.1.mlp.up_proj"])  # a mask and pruned entries to keep
    snap, before = state.snapshot(), _whole_state_of(state)
    ck = state.checkpoint()
    assert apply_stage(Sleb(name="sleb", blocks=2), state, _Calibration(), None) is None  # type: ignore[arg-type]
    assert len(state.blocks.removed) == 2 and model.config.num_hidden_layers == 2
    assert len(model.config.layer_types) == 2
    removed = _whole_state_of(state)
    state.restore(ck)
    assert _same(_whole_state_of(state), before) and state.equal(ck) and state.equal(snap)
    state.restore(snap)  # the snapshot path leaves the same state
    assert _same(_whole_state_of(state), before)
    assert apply_stage(Sleb(name="sleb", blocks=2), state, _Calibration(), None) is None  # type: ignore[arg-type]
    assert _same(_whole_state_of(state), removed)  # the sibling after a restore computes what the first child did
    nested = state.checkpoint()  # taken with blocks removed: restoring it keeps them removed
    state.restore(ck)
    state.restore(nested)
    assert _same(_whole_state_of(state), removed)
    nested.close()
    ck.close()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_checkpoint_undoes_a_rotation_and_its_run_time_hook_as_a_snapshot_does(tied):
    from compress_order.stages.rotate import Rotate

    model = _qwen2(layers=2)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    state = ModelState(model, find_targets(model, ["lm_head"]), whole=True)
    assert state.tied() is tied
    before = _whole_state_of(state)
    ck = state.checkpoint()
    assert ck.sums is None and set(ck.copies) == set(state.targets)  # rotation writes past set_weight: copied now
    stage = Rotate(name="rotate", online=True)
    assert apply_stage(stage, state, _Calibration(), None) is None  # type: ignore[arg-type]
    assert state.online is not None and not state.tied()
    rotated = _whole_state_of(state)
    state.restore(ck)
    after = _whole_state_of(state)
    assert after["hooks"] == {} and after["online"] is None and after["tied"] is tied
    assert _same(after, before) and state.equal(ck)
    nested = state.checkpoint()
    assert apply_stage(stage, state, _Calibration(), None) is None  # type: ignore[arg-type]
    inner = state.checkpoint()  # holds the rotation: a restore brings the hook back
    state.restore(nested)
    assert _same(_whole_state_of(state), before)
    state.restore(inner)
    assert _same(_whole_state_of(state), rotated)
    for c in (inner, nested, ck):
        c.close()


WHOLE_STAGES = {
    "rotate": ("rotate", dict(online=True)),
    "magnitude": ("magnitude", dict(sparsity=0.5)),
    "sleb": ("sleb", dict(blocks=1)),
    "rtn": ("rtn", dict(bits=4, group_size=16)),
}


@pytest.mark.parametrize("labels", [["magnitude", "sleb", "rtn"], ["rotate", "magnitude", "sleb"]])
def test_every_node_of_a_trie_with_whole_model_stages_matches_full_snapshots(labels):
    """Each node's weights, constraints, structure, hook and logits are those of the walk with standalone
    snapshots (what the trie did before checkpoints); rotate after a pruner is infeasible and leaves the state."""
    from compress_order.stages.rotate import Rotate
    from compress_order.stages.sleb import Sleb

    classes = {"rotate": Rotate, "magnitude": Magnitude, "sleb": Sleb, "rtn": RTN}
    stages = {lab: classes[WHOLE_STAGES[lab][0]](name=lab, **WHOLE_STAGES[lab][1]) for lab in labels}
    whole = "rotate" in labels

    def walk(full: bool) -> dict:
        model = _qwen2()
        state = ModelState(model, find_targets(model, ["lm_head"]), whole=whole)
        seen: dict[tuple, dict] = {}

        def apply(node):
            apply_stage(stages[node.stage], state, _Calibration(), None)  # type: ignore[arg-type]

        def visit(node):
            seen[node.order] = _whole_state_of(state)

        if full:
            state.checkpoint = lambda: _Full(state)  # type: ignore[method-assign]
        run_trie(build_trie(labels), state, apply, visit)
        assert not state._open and all(t.before_write is None for t in state.targets.values())
        return seen

    ref, seen = walk(full=True), walk(full=False)
    assert len(seen) == 16 and seen.keys() == ref.keys()
    for order in ref:
        assert _same(seen[order], ref[order]), order


def test_a_constraint_holds_its_mask_as_bits_and_is_changed_only_by_setting_one():
    from compress_order.numerics.constraints import LayerConstraint

    mask = torch.rand(6, 20) < 0.3
    c = LayerConstraint(mask=mask)
    assert c.packed_mask.numel() == 15 and torch.equal(c.mask, mask) and int(c.kept()) == int(mask.sum())
    read = c.mask
    read[:] = True  # an edit of what was read is not the constraint's mask
    assert torch.equal(c.mask, mask)
    c.mask = read
    assert bool(c.mask.all()) and torch.equal(c.clone().mask, read)
    with pytest.raises(TypeError, match="bool"):
        c.mask = read.float()


def test_dense_weights_are_read_back_from_the_model_files_instead_of_copied(tmp_path):
    from transformers import LlamaForCausalLM

    from compress_order.modeling.weight_files import model_folder, safetensors_spans

    _llama().save_pretrained(tmp_path / "m")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    state = ModelState(model, find_targets(model, ["lm_head"]))
    folder = model_folder(model)
    assert folder is not None and state.share_files(safetensors_spans(folder)) == len(state.targets)
    dense, before = state.snapshot(), _state_of(state)
    ck = state.checkpoint()
    assert all(c.file is not None for c in ck.copies.values()) and set(ck.copies) == set(state.targets)
    assert ck.nbytes() < 0.05 * sum(t.weight.numel() * 2 for t in state.targets.values())  # no weight copied
    for t in state.targets.values():
        STAGES["magnitude"].compress(t)
    nested, pruned_state = state.checkpoint(), _state_of(state)  # pruned weights differ from the files
    STAGES["rtn"].compress(state.targets["model.layers.0.mlp.up_proj"])
    assert (
        set(nested.copies) == {"model.layers.0.mlp.up_proj"}
        and nested.copies["model.layers.0.mlp.up_proj"].file is not None
    )
    # pruned without updating the kept entries: a mask over the file (two bits a weight: the mask and -0.0 signs)
    pruned = nested.copies["model.layers.0.mlp.up_proj"]
    n = pruned.shape[0] * pruned.shape[1]
    assert pruned.keep is not None and pruned.nbytes() == 2 * ((n + 7) // 8)
    state.restore(nested)
    assert _same(_state_of(state), pruned_state) and state.equal(nested)
    nested.close()
    state.restore(ck)
    assert _same(_state_of(state), before) and state.equal(ck) and state.equal(dense)
    ck.close()
    ck = state.checkpoint()
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "m" / "model.safetensors").read_bytes())
    STAGES["magnitude"].compress(state.targets["model.layers.0.mlp.up_proj"])
    with pytest.raises(RuntimeError, match="changed during the run"):  # a rewritten file is never read back
        state.restore(ck)
    ck.close()
