"""Decoder families as a tested matrix: a tiny random checkpoint of each, saved like a real one, runs every order
of a calibrated prune+quantize pair and a joint schedule end to end; every compressible layer outside lm_head is
compressed, whatever the family stores it as (Linear, FalconLinear, GPT-2's transposed Conv1D).

docs/how-it-works.md names exactly the families of `FAMILIES` (checked below), so the claim and the matrix cannot drift.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import CONTEXT, FAMILIES, HIDDEN, LAYERS, TEXT, char_tokenizer, family_config, readme_list
from matrix_report import kinds, record

SPARSITY, BITS, GROUP = 0.5, 4, 32

def _projections(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear/Conv1D outside lm_head as (out, in), read independently of compress_order.modeling.targets."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, mod in model.named_modules():
        if "lm_head" in name:
            continue
        if isinstance(mod, Conv1D):  # stored (in, out)
            out[name] = mod.weight.detach().t()
        elif isinstance(mod, nn.Linear):
            out[name] = mod.weight.detach()
    return out


def save_tiny(family: str, path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer(TEXT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def overrides(ckpt: Path, text: dict[str, Path], tmp: Path, stages: str) -> list[str]:
    return [
        f"model.path={ckpt}", "model.name=tiny", f"model.seqlen={CONTEXT}", "model.dtype=float32",
        f"data.train={text['train']}", f"data.valid={text['valid']}", "data.name=tiny",
        "calibration.nsamples=2", "calibration.seqlen=32", "eval.max_windows=2", "eval.backends=none",
        "eval.latency.repeats=1", "eval.latency.warmup=0", "device=cpu", "threads=1",
        f"sparsity={SPARSITY}", f"bits={BITS}", f"group_size={GROUP}", f"stages={stages}", "joint=[sparsegpt_gptq]",
        f"store_dir={tmp / 'store'}", f"hydra.run.dir={tmp / 'run'}", f"hydra.sweep.dir={tmp / 'sweep'}",
    ]  # fmt: skip


def _distinct_per_group(w: torch.Tensor, group: int) -> int:
    """The most distinct values in any (row, group of `group` columns) of a 2-D weight."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    return max(len(torch.unique(g[r, k])) for r in range(rows) for k in range(cols // group))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_every_order_and_compresses_every_projection(family, tiny_text, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from compress_order.config.compose import compose_config
    from compress_order.export.checkpoint import load_constraints
    from helpers import run

    ckpt = save_tiny(family, tmp_path / "ckpt")
    base = AutoModelForCausalLM.from_pretrained(ckpt)
    dense = _projections(base)
    assert dense, family
    done: set[str] = set()

    for stages, orders, sequential in [  # both ways of feeding a block: all layers at once, group by group
        ("[wanda,gptq]", {"wanda > gptq", "gptq > wanda"}, "false"),
        ("[sparsegpt,rtn]", {"sparsegpt > rtn", "rtn > sparsegpt"}, "true"),
    ]:
        extra = ["save=true", f"calibration.true_sequential={sequential}"]
        cfg = compose_config(overrides(ckpt, tiny_text, tmp_path, stages) + extra)
        with caplog.at_level(logging.INFO, logger="compress_order"):
            df = run(cfg, tmp_path / f"out-{stages}")
        full = orders | {"sparsegpt+gptq"}
        done |= full
        assert full <= set(df["order"]), (family, set(df["order"]))
        ppl = df[df.metric == "perplexity"].set_index("order")["value"]
        assert all(math.isfinite(v) for v in ppl), (family, ppl.to_dict())
        sp = df[df.metric == "sparsity"].set_index("order")["value"]
        assert all(sp[o] >= SPARSITY - 1e-9 for o in full), (family, sp.to_dict())

        # Every full order, saved and reloaded: every projection outside lm_head is pruned and on a 4-bit grid.
        saved = sorted((tmp_path / f"out-{stages}" / "models").iterdir())
        assert len(saved) == len(full)
        for folder in saved:
            got = _projections(AutoModelForCausalLM.from_pretrained(folder))
            assert got.keys() == dense.keys()
            for name, w in got.items():
                assert w.shape == dense[name].shape
                assert float((w == 0).float().mean()) >= SPARSITY - 1e-9, (family, folder.name, name)
                assert _distinct_per_group(w, GROUP) <= 2**BITS, (family, folder.name, name)
            # The constraint files list exactly these layers, masks in the (out, in) view: pruned weights are zero.
            layers = load_constraints(folder)["layers"]
            assert set(layers) == set(dense), (family, folder.name)
            for name, entry in layers.items():
                assert list(entry["shape"]) == list(got[name].shape), (family, name)
                assert torch.all(got[name][~entry["mask"]] == 0), (family, folder.name, name)

    # Every family declares its block class: the driver takes it from the metadata, not from a guess.
    blocks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoder blocks")]
    assert blocks and all(f"× {LAYERS} at " in b and b.endswith("(from _no_split_modules)") for b in blocks), blocks
    record("decoder", family, f"tiny random `{type(base).__name__}`, hidden {HIDDEN}, {LAYERS} layers",
           kinds(base.get_submodule(n) for n in dense), ["lm_head"], blocks[0].removeprefix("decoder blocks: "),
           sorted(done))  # fmt: skip


def test_readme_names_exactly_the_tested_families():
    assert readme_list("Decoder families tested on tiny checkpoints of ") == FAMILIES


# ----------------------------------------------------------------------------------------------- layer adapters


class _Twins(nn.Module):
    """A Linear and a transformers Conv1D holding the same (out, in) weight, fed the same input."""

    def __init__(self, cols: int = 64, rows: int = 32) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(cols, rows)
        self.c1d = Conv1D(rows, cols)  # nf=out, nx=in: weight stored (in, out)
        with torch.no_grad():
            self.c1d.weight.copy_(self.lin.weight.t())
            self.c1d.bias.copy_(self.lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.lin(x), self.c1d(x)])


def _stage_runs() -> dict[str, list]:
    from compress_order.stages.gptq import GPTQ
    from compress_order.stages.magnitude import Magnitude
    from compress_order.stages.rtn import RTN
    from compress_order.stages.sparsegpt import SparseGPT
    from compress_order.stages.sparsegpt_gptq import SparseGPTGPTQ
    from compress_order.stages.wanda import Wanda

    return {
        "magnitude": [Magnitude(0.5, name="m")],
        "magnitude-2:4 > rtn": [Magnitude(0.5, nm="2:4", name="m"), RTN(3, group_size=32, name="r")],
        "wanda > gptq-act-order": [Wanda(0.5, name="w"),
                                   GPTQ(3, group_size=32, act_order=True, static_groups=True, name="g")],
        "rtn > sparsegpt": [RTN(3, group_size=32, name="r"), SparseGPT(0.5, name="s")],
        "sparsegpt+gptq": [SparseGPTGPTQ(0.5, 3, group_size=32, name="j")],
    }  # fmt: skip


@pytest.mark.parametrize("order", list(_stage_runs()))
def test_conv1d_is_compressed_exactly_like_the_same_linear(order):
    """GPT-2's Conv1D stores (in, out): through its adapter every stage and statistic sees the Linear's (out, in)
    matrix, so both layers end bit-identical, with their invariants holding and the same outputs."""
    from compress_order.stages.calibration import calibrate_and_compress
    from compress_order.modeling.hessian import HessianStats
    from compress_order.modeling.targets import ModelState, find_targets

    model = _Twins().eval()
    targets = find_targets(model)
    assert set(targets) == {"lin", "c1d"}
    assert targets["c1d"].shape == targets["lin"].shape == (32, 64)
    assert HessianStats(model.c1d).cols == 64
    torch.manual_seed(1)
    batches = [torch.randn(2, 16, 64) for _ in range(3)]
    for stage in _stage_runs()[order]:
        if stage.needs:
            calibrate_and_compress(model, targets, batches, stage)
        else:
            for t in targets.values():
                stage.compress(t)
        ModelState(model, targets).check()
        assert torch.equal(model.c1d.weight.t(), model.lin.weight), (order, stage)
    assert float((model.lin.weight == 0).float().mean()) >= 0.5
    out = model(batches[0])
    torch.testing.assert_close(out[0], out[1])


def test_conv1d_set_weight_writes_the_stored_layout_and_snapshots_restore():
    from compress_order.modeling.targets import ModelState, find_targets

    model = _Twins().eval()
    targets = find_targets(model)
    state = ModelState(model, targets)
    snap = state.snapshot()
    t = targets["c1d"]
    w = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64)
    t.set_weight(w)
    assert model.c1d.weight.shape == (64, 32) and torch.equal(model.c1d.weight, w.t())
    assert torch.equal(t.weight, w) and t.weight.is_contiguous()
    state.restore(snap)
    assert state.equal(snap) and torch.equal(model.c1d.weight.t(), model.lin.weight)


def test_grouped_and_depthwise_conv2d_are_compressed_as_their_own_2d_view():
    """A grouped conv's weight (out, in/groups, kh, kw) is one (out, in/groups·kh·kw) matrix; every group's
    patches are samples of its columns. Calibrated stages run on it and every invariant holds."""
    from compress_order.stages.calibration import calibrate_and_compress
    from compress_order.stages.gptq import GPTQ
    from compress_order.stages.sparsegpt import SparseGPT
    from compress_order.stages.wanda import Wanda
    from compress_order.modeling.targets import ModelState, find_targets

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),  # grouped
    ).eval()  # fmt: skip
    targets = find_targets(model)
    assert targets["2"].shape == (8, 9) and targets["4"].shape == (16, 36)
    batches = [torch.randn(2, 4, 8, 8) for _ in range(2)]
    state = ModelState(model, targets)
    dense = state.snapshot()
    for stages in ([Wanda(0.5, name="w"), GPTQ(4, name="g")], [GPTQ(4, name="g"), SparseGPT(0.5, name="s")]):
        state.restore(dense)
        for stage in stages:
            calibrate_and_compress(model, targets, batches, stage)
            state.check()
        assert all(float((t.weight == 0).float().mean()) >= 0.5 for t in targets.values())
        assert torch.isfinite(model(batches[0])).all()


# ----------------------------------------------------------------------------------------------- block discovery


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class _Declared(nn.Module):
    """Two ModuleLists of target-holding modules: structure alone picks the larger; the metadata names the other."""

    _no_split_modules = ["_Layer"]

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer() for _ in range(2))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return sum(h(x) for h in self.heads)


def test_blocks_come_from_no_split_modules_else_structure(caplog):
    from compress_order.modeling.blocks import find_blocks
    from compress_order.modeling.targets import find_targets

    model = _Declared()
    targets = find_targets(model)
    with caplog.at_level(logging.INFO, logger="compress_order"):
        assert find_blocks(model, targets)[0] == "layers"
        model2 = _Declared()
        model2._no_split_modules = ["NoSuchBlock"]  # stale metadata: fall back to structure
        assert find_blocks(model2, find_targets(model2))[0] == "heads"
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "decoder blocks: _Layer × 2 at layers (from _no_split_modules)"
    assert lines[1].startswith("decoder blocks: Sequential × 3 at heads (by structure")


# ----------------------------------------------------------------------------------------------- export sidecar


@pytest.mark.parametrize("family,layout", [("GPT-2", "(in, out)"), ("LLaMA", "(out, in)")])
def test_sidecar_states_the_stored_layout_and_its_masks_and_codes_map_onto_it(family, layout, tmp_path):
    """compression.json indexes masks and codes in the (out, in) view; `layout`/`stored_shape` say where they
    land in the saved tensor: for GPT-2's Conv1D, mask[r, c] and code[r, c] belong to stored[c, r]."""
    import json

    from transformers import AutoModelForCausalLM

    from compress_order.export.checkpoint import load_constraints, save_model
    from compress_order.loaders.models import LoadedModel
    from compress_order.stages.magnitude import Magnitude
    from compress_order.stages.rtn import RTN
    from compress_order.modeling.targets import find_targets

    ckpt = save_tiny(family, tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    targets = find_targets(model, ["lm_head"])
    for stage in (Magnitude(SPARSITY, name="magnitude"), RTN(BITS, GROUP, name="rtn")):
        for t in targets.values():
            stage.compress(t)
    lm = LoadedModel(model, "causal_lm", "tiny")
    d = save_model(lm, targets, ("magnitude", "rtn"), tmp_path / "m", fmt="dense")
    raw = json.loads((d / "compression.json").read_text())["layers"]
    side = load_constraints(d)["layers"]
    saved = AutoModelForCausalLM.from_pretrained(d)
    for name, entry in raw.items():
        stored = saved.get_submodule(name).weight.detach()
        assert entry["layout"] == layout and entry["kind"] == type(saved.get_submodule(name)).__name__
        assert entry["stored_shape"] == list(stored.shape)
        view = stored.t() if layout == "(in, out)" else stored  # what the layout says, nothing else
        assert list(view.shape) == entry["shape"]
        mask, q = side[name]["mask"], side[name]["quant"]
        assert torch.all(view[~mask] == 0) and int((~mask).sum()) >= SPARSITY * mask.numel()
        g = torch.arange(view.shape[1]) // q["group_size"]
        scale, zero = q["scale"][:, g], q["zero"][:, g]
        codes = torch.round(view / scale) + zero
        assert codes.min() >= 0 and codes.max() <= 2**BITS - 1
        torch.testing.assert_close((codes - zero) * scale, view, rtol=0, atol=1e-6)

# ----------------------------------------------------------------------------------------------- packed backends


@pytest.mark.parametrize("name", ["int8_weight_only", "int4_weight_only"])
def test_conv1d_model_is_packed_as_linear_and_matches_fake_quant(name):
    """torchao kernels take nn.Linear: a GPT-2 Conv1D is served as the Linear it computes, with the same output."""
    from transformers import GPT2LMHeadModel

    from compress_order.evaluation.backends import BACKENDS
    from compress_order.stages.rtn import RTN
    from compress_order.modeling.targets import find_targets

    torch.manual_seed(0)
    model = GPT2LMHeadModel(family_config("GPT-2", 30)).eval()
    targets = find_targets(model, ["lm_head"])
    for t in targets.values():
        RTN(4, 32, False, name="r").compress(t)
    backend = BACKENDS[name]
    assert backend.fits(targets) is None
    packed = backend.convert(model, targets, torch.device("cpu"))
    for n in targets:
        assert type(packed.get_submodule(n)) is nn.Linear
        assert type(packed.get_submodule(n).weight).__name__ != "Parameter"  # a packed tensor subclass
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the evaluated model is untouched
    ids = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        ref, out = model(ids).logits, packed(ids).logits
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_conv2d_gets_a_reason_from_linear_kernels():
    from compress_order.evaluation.backends import BACKENDS
    from compress_order.stages.rtn import RTN
    from compress_order.modeling.targets import find_targets

    targets = find_targets(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 4)))
    for t in targets.values():
        RTN(4, -1, False, name="r").compress(t)
    for name in ("int8_weight_only", "int4_weight_only"):
        assert BACKENDS[name].fits(targets) == (
            "torchao weight-only kernels exist for Linear layers only; 0 is Conv2d"
        ), name
