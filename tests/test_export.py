"""compressed-tensors pack-quantized export: the node's own codes, read back by compressed-tensors and transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from safetensors.torch import load_file

from compress_order.config.compose import compose_config
from compress_order.core.instantiate import build
from compress_order.core.errors import UserError
from compress_order.export.compressed_tensors import FLOAT_FORMAT, ActScheme
from compress_order.export.checkpoint import checkpoint_format, save_model, summary_line
from compress_order.evaluation.measure import compression_metrics
from compress_order.loaders.models import causal_lm
from compress_order.numerics.quant import fit_grid
from helpers import run, settings
from compress_order.stages.base import set_quantized
from compress_order.stages.magnitude import Magnitude
from compress_order.modeling.targets import ModelState, find_targets
from compress_order.evaluation.tasks.lm import LMTask


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    lm = causal_lm("tiny", str(tiny_llama))
    targets = find_targets(lm.model, lm.skip)
    state = ModelState(lm.model, targets)
    return lm, targets, state, state.snapshot()


def rtn(targets, bits: int, group_size: int, sym: bool, layers=None) -> None:
    for name, t in targets.items():
        b = layers.get(name, bits) if layers else bits
        grid = fit_grid(t.weight, b, group_size, sym)
        set_quantized(t, grid.project(t.weight), grid, "rtn")


def dequantized(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as compressed-tensors' own model-free dequantizer gives them back."""
    tensors = load_file(str(path / "model.safetensors"))
    return CompressedTensorsDequantizer(path, dtype=dtype).process(tensors)


def qconfig(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_exports_its_own_codes_bit_for_bit(tiny_lm, tmp_path, bits, group_size, sym):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    rtn(targets, bits, group_size, sym)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m", fmt="compressed-tensors")

    qc = qconfig(d)
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "pack-quantized", "compressed")
    assert qc["ignore"] == ["lm_head"] and list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert sorted(group["targets"]) == sorted(targets)
    w = group["weights"]
    assert (w["num_bits"], w["symmetric"], w["type"]) == (bits, sym, "int")
    assert (w["strategy"], w["group_size"]) == (("group", 32) if group_size == 32 else ("channel", None))

    raw = load_file(str(d / "model.safetensors"))
    back = dequantized(d, torch.float32)
    for name, t in targets.items():
        grid = t.constraint.grid
        codes = unpack_from_int32(raw[f"{name}.weight_packed"], bits, t.weight.shape)
        assert torch.equal(codes.float() + 2 ** (bits - 1), grid.codes(t.weight))  # the grid's own codes
        assert (f"{name}.weight_zero_point" in raw) is (not sym)
        assert torch.equal(back[f"{name}.weight"], t.module.weight.data)  # bit for bit
    assert torch.equal(back["lm_head.weight"], lm.model.lm_head.weight.data)

    side = json.loads((d / "compression.json").read_text())
    assert side["checkpoint"]["exact"] is True and side["checkpoint"]["mismatched_weights"] == 0
    vllm = side["checkpoint"]["vllm"]
    assert vllm["servable"] is (bits in (4, 8))
    if bits not in (4, 8):
        assert vllm["reasons"] == [f"{bits}-bit weights (WNA16 takes 4 or 8)"]


def test_transformers_reloads_a_symmetric_export_to_the_same_logits(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    rtn(targets, 4, 32, True)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m")  # auto: a node with a quantizer → compressed-tensors
    model = AutoModelForCausalLM.from_pretrained(d)
    x = torch.arange(1, 33).reshape(1, 32) % lm.model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(model(x).logits, lm.model(x).logits)  # the first forward decompresses
    mods = dict(model.named_modules())
    assert all(torch.equal(mods[n].weight.data, t.module.weight.data) for n, t in targets.items())
    assert json.loads((d / "compression.json").read_text())["checkpoint"]["transformers_reload"] is True


def test_the_sidecar_says_transformers_cannot_reload_zero_points(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    rtn(targets, 4, 32, False)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m", "compressed-tensors")
    assert json.loads((d / "compression.json").read_text())["checkpoint"]["transformers_reload"] is False
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(d)
    # so `auto` saves grids with zero-points dense, which reloads bit for bit
    d = save_model(lm, targets, ("rtn",), tmp_path / "auto")
    assert json.loads((d / "compression.json").read_text())["checkpoint"]["format"] == "dense"
    mods = dict(AutoModelForCausalLM.from_pretrained(d).named_modules())
    assert all(torch.equal(mods[n].weight.data, t.module.weight.data) for n, t in targets.items())


def test_mixed_widths_become_one_config_group_each(tiny_lm, tmp_path):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    wide = {n: 8 for n in targets if n.endswith(("q_proj", "down_proj"))}
    rtn(targets, 4, 32, False, layers=wide)
    d = save_model(lm, targets, ("rtn_mixed",), tmp_path / "m", "compressed-tensors")
    groups = qconfig(d)["config_groups"]
    by_bits = {g["weights"]["num_bits"]: sorted(g["targets"]) for g in groups.values()}
    assert by_bits == {4: sorted(set(targets) - set(wide)), 8: sorted(wide)}
    back = dequantized(d, torch.float32)
    assert all(torch.equal(back[f"{n}.weight"], t.module.weight.data) for n, t in targets.items())
    vllm = json.loads((d / "compression.json").read_text())["checkpoint"]["vllm"]
    assert not vllm["servable"]
    assert vllm["reasons"] == [
        "model.layers.0.self_attn: q_proj, k_proj, v_proj differ in scheme but vLLM fuses them into qkv_proj"
    ]


def test_group_size_vllm_cannot_take_is_named(tiny_lm, tmp_path):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    rtn(targets, 4, 16, True)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m")
    vllm = json.loads((d / "compression.json").read_text())["checkpoint"]["vllm"]
    assert vllm == {"path": "WNA16", "servable": False, "reasons": ["group size 16 (WNA16 takes -1, 32, 64, 128)"]}


def test_w8a8_export_carries_the_input_activation_scheme(tiny_lm, tmp_path):
    """bits=8 group_size=-1 act_bits=8, rtn with sym=true: an int-quantized checkpoint whose config groups carry the
    dynamic per-token int8 input scheme, one int8 per code, the evaluated weights back bit for bit, and a line
    saying vLLM's W8A8 int8 path serves it."""
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    rtn(targets, 8, -1, True)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m", act=ActScheme(8, "token"))

    qc = qconfig(d)
    assert (qc["format"], qc["quant_method"]) == ("int-quantized", "compressed-tensors")
    group = qc["config_groups"]["group_0"]
    assert group["format"] == "int-quantized" and sorted(group["targets"]) == sorted(targets)
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["symmetric"], w["strategy"], w["dynamic"]) == (8, True, "channel", False)
    assert (a["num_bits"], a["type"], a["symmetric"], a["dynamic"], a["strategy"]) == (8, "int", True, True, "token")

    raw = load_file(str(d / "model.safetensors"))
    back = dequantized(d, torch.float32)
    for name, t in targets.items():
        assert raw[f"{name}.weight"].dtype == torch.int8 and f"{name}.weight_zero_point" not in raw
        assert torch.equal(raw[f"{name}.weight"].float() + 128, t.constraint.grid.codes(t.weight))
        assert torch.equal(back[f"{name}.weight"], t.module.weight.data)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        model(torch.arange(1, 17).reshape(1, 16))  # the first forward decompresses
    mods = dict(model.named_modules())
    assert all(torch.equal(mods[n].weight.data, t.module.weight.data) for n, t in targets.items())
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert ck["exact"] and ck["activations"] == "A8 token-wise dynamic symmetric"
    assert ck["vllm"] == {"path": "W8A8 int8", "servable": True, "reasons": []}
    assert summary_line(ck).startswith(
        "compressed-tensors int-quantized, 8-bit per channel symmetric, A8 token-wise dynamic symmetric activations; "
        "exact; vLLM W8A8 int8 serves it; ")
    d = save_model(lm, targets, ("rtn",), tmp_path / "dense", "dense", act=ActScheme(8, "token"))
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert summary_line(ck).startswith(
        "dense checkpoint (evaluated with A8 token-wise dynamic symmetric activations, not in its config); ")


@pytest.mark.parametrize("bits,group_size,sym,act,path,reasons", [
    (8, -1, False, ActScheme(8, "token"), "W8A8 int8",
     ["asymmetric 8-bit weights (vLLM's W8A8/W4A8 take symmetric weights, sym: true)"]),
    (8, 32, True, ActScheme(8, "tensor"), "W8A8 int8",
     ["dynamic per-tensor activations (vLLM's int8 kernels take dynamic per-token or static per-tensor scales)",
      "8-bit weights in groups of 32 (W8A8 int8 takes per-channel weights, group_size=-1)"]),
    (8, -1, True, ActScheme(4, "token"), "W8A8 int8",
     ["4-bit activations (vLLM's integer-activation kernels take int8)"]),
    (3, 32, True, ActScheme(8, "token"), "W3A8",
     ["3-bit weights with quantized activations (vLLM takes 8-bit: W8A8, or 4-bit: W4A8)"]),
    (4, 32, True, ActScheme(8, "token"), "W4A8 int", []),
    (8, -1, True, ActScheme(8, "static"), "W8A8 int8", []),
    (4, 32, True, ActScheme(8, "static"), "W4A8 int",
     ["static activations with 4-bit weights (vLLM's W4A8 int takes dynamic per-token ones)"]),
])  # fmt: skip
def test_servability_with_quantized_activations(tiny_lm, tmp_path, bits, group_size, sym, act, path, reasons):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    rtn(targets, bits, group_size, sym)
    scales = {n: torch.full((1,), 0.01) for n in targets} if act.static else None
    d = save_model(lm, targets, ("rtn",), tmp_path / "m", "compressed-tensors", act=act, input_scales=scales)
    vllm = json.loads((d / "compression.json").read_text())["checkpoint"]["vllm"]
    assert vllm == {"path": path, "servable": not reasons, "reasons": reasons}
    back = dequantized(d, torch.float32)  # every width is one int8 per code, read back bit for bit
    assert all(torch.equal(back[f"{n}.weight"], t.module.weight.data) for n, t in targets.items())


def test_saved_files_follow_the_umask(tiny_lm, tmp_path):
    """safetensors writes 0600; the checkpoint's files take the umask's mode like every other result file."""
    import os
    import stat

    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    prune = Magnitude(sparsity=0.5, name="magnitude")
    for t in targets.values():
        prune.compress(t)
    rtn(targets, 4, 32, True)
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            d = save_model(lm, targets, ("magnitude", "rtn"), tmp_path / f"m{umask:o}")
        finally:
            os.umask(old)
        files = [f for f in d.iterdir() if f.is_file()]
        names = {f.name for f in files}
        assert {"model.safetensors", "compression.safetensors", "compression.json", "config.json"} <= names
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: mode for f in files}


def test_half_precision_export_reports_scales_the_dtype_cannot_hold(tiny_llama, tmp_path):
    lm = causal_lm("tiny", str(tiny_llama), dtype="float16")
    targets = find_targets(lm.model, lm.skip)
    rtn(targets, 4, 32, False)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m", "compressed-tensors")
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    back = dequantized(d, torch.float16)
    differ = sum(int((back[f"{n}.weight"] != t.module.weight.data).sum()) for n, t in targets.items())
    assert ck["mismatched_weights"] == differ and ck["exact"] is (differ == 0)


def test_pruned_weights_are_zero_codes_and_the_sidecar_records_structure(tiny_lm, tmp_path):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    prune = Magnitude(sparsity=0.5, nm="2:4", name="magnitude")
    for t in targets.values():
        prune.compress(t)
    rtn(targets, 4, 32, True)
    d = save_model(lm, targets, ("magnitude", "rtn"), tmp_path / "m")
    raw, back = load_file(str(d / "model.safetensors")), dequantized(d, torch.float32)
    layers = json.loads((d / "compression.json").read_text())["layers"]
    for name, t in targets.items():
        codes = unpack_from_int32(raw[f"{name}.weight_packed"], 4, t.weight.shape)
        assert (codes[~t.constraint.mask] == 0).all()  # symmetric zero code
        assert torch.equal(back[f"{name}.weight"], t.module.weight.data)
        assert layers[name]["structure"] == "2:4"
        assert layers[name]["sparsity"] == pytest.approx(float((t.weight == 0).float().mean()))
        assert layers[name]["sparsity"] >= 0.5


def test_sparse_only_node_is_a_plain_dense_checkpoint(tiny_lm, tmp_path):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    for t in targets.values():
        Magnitude(sparsity=0.6, name="magnitude").compress(t)
    assert checkpoint_format(targets) == "dense"
    d = save_model(lm, targets, ("magnitude",), tmp_path / "m")
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    side = json.loads((d / "compression.json").read_text())
    assert side["checkpoint"]["format"] == "dense" and side["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert side["checkpoint"]["disk_bytes"] == (d / "model.safetensors").stat().st_size  # float32 weights, dense
    assert side["checkpoint"]["size_bytes"] == compression_metrics(lm.model, targets)["size_bytes"]
    saved = load_file(str(d / "model.safetensors"))
    for name, t in targets.items():
        assert torch.equal(saved[f"{name}.weight"], t.module.weight.data)
        assert side["layers"][name]["structure"] == "unstructured"
        assert side["layers"][name]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_dense_format_stays_available_and_bad_formats_are_named(tiny_lm, tmp_path):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    rtn(targets, 4, 32, False)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m", fmt="dense")
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    with pytest.raises(UserError, match="save format 'gguf' is unknown; valid: auto, compressed-tensors, dense"):
        save_model(lm, targets, ("rtn",), tmp_path / "x", fmt="gguf")


def _ppl_of_reload(cfg, d: Path) -> float:
    from transformers import AutoModelForCausalLM

    lm = build(cfg.model)
    lm.model = AutoModelForCausalLM.from_pretrained(d)
    cfg.device = "cpu"
    metrics, _ = LMTask(lm, build(cfg.data), settings(cfg)).evaluate(lm.model)
    return metrics["perplexity"]


def test_saved_orders_reload_to_the_evaluated_perplexity(tiny_overrides, tmp_path, caplog):
    """Mask and grid in both orders, and GPTQ with act-order: transformers reloads the exports (symmetric grids)
    and gives each node's perplexity exactly. The run reports each saved model's bytes on disk beside its
    computed size_bytes."""
    over = tiny_overrides + [
        "bits=4", "group_size=32", "sparsity=0.5", "save=true", "eval.backends=none",
        "stages=[magnitude,{name:rtn,sym:true,label:rtn}]",
        "joint=[]",
    ]  # fmt: skip
    cfg = compose_config(over)
    with caplog.at_level(logging.INFO, logger="compress_order.export.checkpoint"):
        df = run(cfg, tmp_path / "out")
    ppl = df[df["metric"] == "perplexity"].set_index("order")["value"]
    size = df[df["metric"] == "size_bytes"].set_index("order")["value"]
    for folder, order in (("magnitude_then_rtn", "magnitude > rtn"), ("rtn_then_magnitude", "rtn > magnitude")):
        d = tmp_path / "out" / "models" / folder
        assert qconfig(d)["format"] == "pack-quantized"
        assert _ppl_of_reload(cfg, d) == ppl[order]
        ck = json.loads((d / "compression.json").read_text())["checkpoint"]
        assert ck["disk_bytes"] == (d / "model.safetensors").stat().st_size
        assert (ck["size_bytes"], ck["dense_bits"]) == (size[order], 16)
        # the packed codes are smaller on disk than the float32 model, larger than the 16-bit accounting
        # (embeddings and lm_head stay float32 on disk; the scales are float32)
        assert size[order] < ck["disk_bytes"] < size["dense"] * 2
        assert f"saved {d} (" in caplog.text
        assert f"; {ck['disk_bytes']:,} bytes on disk, size_bytes {size[order]:,.0f} (16-bit dense layers)" in caplog.text

    over = tiny_overrides + [
        "bits=4", "group_size=32", "save=true", "eval.backends=none",
        "stages=[{name:gptq,act_order:true,static_groups:true,sym:true,label:gptq}]",
    ]  # fmt: skip
    cfg = compose_config(over)
    df = run(cfg, tmp_path / "gptq")
    d = tmp_path / "gptq" / "models" / "gptq"
    side = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert side["exact"] and side["vllm"]["servable"]
    assert _ppl_of_reload(cfg, d) == df[(df["metric"] == "perplexity") & (df["order"] == "gptq")]["value"].item()


def test_export_command_rebuilds_an_order_of_a_run_exactly(tiny_overrides, tmp_path, capsys):
    from compress_order.cli.main import main

    over = tiny_overrides + ["bits=4", "group_size=32", "sparsity=0.5", "save=true", "eval.backends=none",
                             "stages=[magnitude,{name:gptq,sym:true,label:gptq}]"]  # fmt: skip
    assert main(["run", *over]) == 0
    run_dir = tmp_path / "run"
    d = run_dir / "models" / "gptq_then_magnitude"
    saved = load_file(str(d / "model.safetensors"))
    capsys.readouterr()

    assert main(["export", str(run_dir), "--order", "gptq > magnitude", "--format", "compressed-tensors"]) == 0
    out = capsys.readouterr().out
    assert f"{d}: compressed-tensors pack-quantized, 4-bit group 32 symmetric; exact; vLLM WNA16 serves it" in out
    again = load_file(str(d / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    back = dequantized(d, torch.float32)
    assert main(["export", str(run_dir), "--order", "gptq > magnitude", "--format", "dense"]) == 0
    dense = load_file(str(d / "model.safetensors"))
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    assert dense.keys() == back.keys() and all(torch.equal(dense[k], back[k]) for k in dense)

    assert main(["export", str(run_dir), "--order", "magnitude > rtn"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "compress-order: error: order 'magnitude > rtn' is not a full order of this run; "
        "valid: gptq > magnitude; magnitude > gptq"
    )
    assert main(["export", str(tmp_path), "--order", "gptq > magnitude"]) == 2
    assert "has no .hydra/config.yaml" in capsys.readouterr().err
    assert main(["export", str(run_dir)]) == 2
    assert "export: the following arguments are required: --order" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--order", "gptq > magnitude", "--format", "onnx"]) == 2
    assert "save format 'onnx' is unknown; valid: auto, compressed-tensors, dense" in capsys.readouterr().err


def test_each_calibration_seed_saves_and_exports_its_own_model(tiny_overrides, tmp_path, capsys):
    """A run with several calibration seeds saves each seed's model in models/<order>/seed-<N>/ (none overwrites
    another); `export --seed` (default the first) rebuilds that seed's model into the same folder byte for byte, and
    it reloads to that seed's perplexity; a seed the run did not use is one line naming the valid ones."""
    from compress_order.cli.main import main

    over = tiny_overrides + ["bits=4", "group_size=32", "eval.backends=none", "replicates=2", "save=true",
                             "stages=[{name:gptq,sym:true,label:gptq}]"]  # fmt: skip
    assert main(["run", *over]) == 0
    run_dir = tmp_path / "run"
    df = pd.read_parquet(run_dir / "results.parquet")
    ppl = df[(df["metric"] == "perplexity") & (df["order"] == "gptq")].set_index("seed")["value"]
    assert sorted(ppl.index) == [0, 1] and ppl[0] != ppl[1]
    cfg = compose_config(over)
    assert sorted(p.name for p in (run_dir / "models" / "gptq").iterdir()) == ["seed-0", "seed-1"]
    saved = {}
    for seed in (0, 1):
        d = run_dir / "models" / "gptq" / f"seed-{seed}"
        assert _ppl_of_reload(cfg, d) == ppl[seed]
        saved[seed] = load_file(str(d / "model.safetensors"))
    assert not all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    capsys.readouterr()
    for seed, args in ((0, []), (1, ["--seed", "1"])):
        d = run_dir / "models" / "gptq" / f"seed-{seed}"
        assert main(["export", str(run_dir), "--order", "gptq", *args]) == 0
        assert f"\n{d}: compressed-tensors pack-quantized" in "\n" + capsys.readouterr().out
        again = load_file(str(d / "model.safetensors"))
        assert again.keys() == saved[seed].keys() and all(torch.equal(again[k], saved[seed][k]) for k in again)
    assert sorted(p.name for p in (run_dir / "models" / "gptq").iterdir()) == ["seed-0", "seed-1"]
    assert main(["export", str(run_dir), "--order", "gptq", "--seed", "7"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "compress-order: error: seed 7 is not a calibration seed of this run; valid: 0, 1"]  # fmt: skip
    assert main(["export", str(run_dir), "--order", "gptq", "--seed", "one"]) == 2
    assert "argument --seed: invalid int value: 'one'" in capsys.readouterr().err


def test_a_w8a8_run_saves_and_exports_its_activation_scheme(tiny_overrides, tmp_path, capsys):
    """act_bits=8 with 8-bit symmetric per-channel GPTQ: the saved checkpoint carries the per-token int8 input
    scheme and is servable as W8A8; `export` calibrates on quantized inputs as the run did (byte for byte)."""
    from compress_order.cli.main import main

    over = tiny_overrides + ["bits=8", "group_size=-1", "act_bits=8", "eval.backends=none", "save=true",
                             "stages=[{name:gptq,sym:true,label:gptq}]"]  # fmt: skip
    assert main(["run", *over]) == 0
    d = tmp_path / "run" / "models" / "gptq"
    group = qconfig(d)["config_groups"]["group_0"]
    a = group["input_activations"]
    assert (group["format"], a["num_bits"], a["strategy"], a["dynamic"], a["symmetric"]) == (
        "int-quantized", 8, "token", True, True)  # fmt: skip
    saved = load_file(str(d / "model.safetensors"))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--order", "gptq"]) == 0
    assert "; exact; vLLM W8A8 int8 serves it; " in capsys.readouterr().out
    again = load_file(str(d / "model.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in again)


def test_export_of_a_run_on_the_embedded_assets_in_a_fresh_process(tiny_overrides, tmp_path):
    """The saved config names the embedded data through ${asset:…}: `export`, run as its own process, resolves it."""
    import os
    import subprocess
    import sys

    from compress_order.cli.main import main

    over = [o for o in tiny_overrides if not o.startswith(("data.train=", "data.valid=", "data.name="))]
    assert main(["run", *over, "eval.max_windows=2", "eval.backends=none", "bits=4", "group_size=32"]) == 0
    run_dir = tmp_path / "run"
    assert "${asset:shakespeare/valid.txt}" in (run_dir / ".hydra" / "config.yaml").read_text()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "compress_order", "export", str(run_dir), "--order", "rtn > magnitude",
                           "--format", "dense"], capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(f"{run_dir / 'models' / 'rtn_then_magnitude'}: dense checkpoint; ")
    assert " bytes on disk, size_bytes " in proc.stdout


def test_export_of_a_run_with_static_activation_ranges_rebuilds_its_model(tiny_overrides, tmp_path, capsys):
    """Export goes through the run's pipeline: with `act_granularity=static` the ranges are observed on the current
    weights before each calibrated stage, as the run did (export used to install the quantizer without observing,
    and died with 'static activation ranges were not observed'), and the rebuilt weights are the run's."""
    from compress_order.cli.main import main

    over = tiny_overrides + ["bits=4", "group_size=32", "act_bits=8", "act_granularity=static", "save=true",
                             "eval.backends=none", "stages=[{name:gptq,sym:true,label:gptq}]"]  # fmt: skip
    assert main(["run", *over]) == 0
    d = tmp_path / "run" / "models" / "gptq"
    saved = load_file(str(d / "model.safetensors"))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--order", "gptq"]) == 0
    assert f"{d}: " in capsys.readouterr().out
    again = load_file(str(d / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    # the checkpoint says static and stores each layer's observed scale (max |x| / 127), not a dynamic scheme
    (group,) = qconfig(d)["config_groups"].values()
    acts = group["input_activations"]
    assert (acts["type"], acts["strategy"], acts["dynamic"]) == ("int", "tensor", False)
    scales = {k: v for k, v in saved.items() if k.endswith(".input_scale")}
    assert len(scales) == len(group["targets"]) and all(v.numel() == 1 and float(v) > 0 for v in scales.values())
    assert all(torch.equal(saved[k.replace("input_scale", "input_zero_point")], torch.zeros(1, dtype=torch.int8))
               for k in scales)  # fmt: skip
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert ck["activations"] == "A8 static per-tensor symmetric"
    assert ck["vllm"]["reasons"] == ["static activations with 4-bit weights (vLLM's W4A8 int takes dynamic per-token "
                                     "ones)"]  # fmt: skip
    back = dequantized(d, torch.float32)  # compressed-tensors' own reader takes the layers with their input scales
    assert all(f"{k.removesuffix('.input_scale')}.weight" in back for k in scales)


# ------------------------------------------------------------------------------------------- float formats


def float_rtn(targets, fmt: str, group_size: int) -> None:
    from compress_order.numerics.formats import fit_weight_grid

    for t in targets.values():
        grid = fit_weight_grid(t.weight, fmt, 8 if fmt == "fp8" else 4, group_size, True)
        set_quantized(t, grid.project(t.weight), grid, "rtn")


def pruned_float_lm(tiny_llama, fmt: str, group_size: int, dtype: str):
    """The tiny model in `dtype`, half its weights pruned, then rounded onto `fmt`'s grid (zeros are codes)."""
    lm = causal_lm("tiny", str(tiny_llama), dtype=dtype)
    targets = find_targets(lm.model, lm.skip)
    for t in targets.values():
        Magnitude(sparsity=0.5, name="magnitude").compress(t)
    float_rtn(targets, fmt, group_size)
    return lm, targets


FLOAT_CASES = [("fp8", -1, "float32"), ("fp8", 128, "float32"), ("nvfp4", 16, "bfloat16"), ("mxfp4", 32, "float32"),
               ("mxfp4", 32, "bfloat16")]  # fmt: skip
CT_FLOAT = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


@pytest.mark.parametrize("fmt,group_size,dtype", FLOAT_CASES)
def test_float_grids_export_their_own_codes_bit_for_bit(tiny_llama, tmp_path, fmt, group_size, dtype):
    """`auto` writes a float grid in compressed-tensors' format for it, from the grid's codes and scales; the
    library's own dequantizer gives back the evaluated weights bit for bit, pruned weights as zero codes."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    from compress_order.numerics.formats import codebook

    lm, targets = pruned_float_lm(tiny_llama, fmt, group_size, dtype)
    d = save_model(lm, targets, ("magnitude", "rtn"), tmp_path / "m")
    qc = qconfig(d)
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", CT_FLOAT[fmt]) and qc["ignore"] == ["lm_head"]
    by_strategy = {}
    for group in qc["config_groups"].values():
        w = group["weights"]
        assert (w["type"], w["num_bits"], w["symmetric"], group["format"]) == (
            "float", 8 if fmt == "fp8" else 4, True, CT_FLOAT[fmt])  # fmt: skip
        by_strategy[w["strategy"], w["group_size"]] = sorted(group["targets"])
    wide = sorted(n for n, t in targets.items() if t.weight.shape[1] > 128)  # down_proj: two groups of 128
    assert by_strategy == {
        ("fp8", -1): {("channel", None): sorted(targets)},
        ("fp8", 128): {("group", 128): wide, ("channel", None): sorted(set(targets) - set(wide))},  # one group: a row
        ("nvfp4", 16): {("tensor_group", 16): sorted(targets)},
        ("mxfp4", 32): {("group", 32): sorted(targets)}}[(fmt, group_size)]  # fmt: skip

    raw = load_file(str(d / "model.safetensors"))
    back = dequantized(d, getattr(torch, dtype))
    for name, t in targets.items():
        grid = t.constraint.grid
        values = codebook(grid.bits)[grid.codes(t.weight).long()]
        if fmt == "fp8":
            assert raw[f"{name}.weight"].dtype == torch.float8_e4m3fn
            assert torch.equal(raw[f"{name}.weight"].float(), values)  # the grid's own codes
            assert torch.equal(raw[f"{name}.weight_scale"], grid.scale.to(t.weight.dtype))
        else:
            packed = raw[f"{name}.weight_packed"]
            assert packed.dtype == torch.uint8 and packed.shape == (t.weight.shape[0], t.weight.shape[1] // 2)
            assert torch.equal(unpack_fp4_from_uint8(packed, *t.weight.shape, dtype=torch.float32), values)
            nibbles = torch.stack([packed & 15, packed >> 4], -1).reshape(t.weight.shape)
            assert (nibbles[~t.constraint.mask] == 0).all()  # pruned: E2M1's +0
            scale = raw[f"{name}.weight_scale"]
            if fmt == "nvfp4":  # E4M3 group scales over compressed-tensors' global scale: 1 / the per-tensor scale
                g = raw[f"{name}.weight_global_scale"]
                assert scale.dtype == torch.float8_e4m3fn and g.dtype == torch.float32 and g.shape == (1,)
                assert float(g) == float(1 / grid.tensor_scale.float())
                assert torch.equal(scale.float() / g, grid.scale)
            else:  # E8M0: a biased exponent
                assert scale.dtype == torch.uint8 and torch.equal(torch.exp2(scale.float() - 127), grid.scale)
        assert torch.equal(back[f"{name}.weight"], t.module.weight.data), name  # bit for bit
        assert (back[f"{name}.weight"][~t.constraint.mask] == 0).all()
    assert torch.equal(back["lm_head.weight"], lm.model.lm_head.weight.data)
    side = json.loads((d / "compression.json").read_text())
    assert {e["quant"]["format"] for e in side["layers"].values()} == {fmt}
    ck = side["checkpoint"]
    assert (ck["format"], ck["compression_format"], ck["exact"], ck["mismatched_weights"]) == (
        "compressed-tensors", CT_FLOAT[fmt], True, 0)  # fmt: skip
    assert ck["transformers_reload"] is (fmt == "fp8" or dtype == "bfloat16")


def test_nvfp4_of_a_float32_model_reads_back_in_bfloat16_and_says_so(tiny_llama, tmp_path):
    """compressed-tensors 0.20 decompresses NVFP4 into bfloat16: a float32 model's NVFP4 weights (E2M1 times an
    E4M3-over-float32 scale) come back rounded to bfloat16; the sidecar counts exactly those and the line says why."""
    lm, targets = pruned_float_lm(tiny_llama, "nvfp4", 16, "float32")
    d = save_model(lm, targets, ("magnitude", "rtn"), tmp_path / "m")
    back = dequantized(d, torch.float32)
    differ = 0
    for name, t in targets.items():
        w = t.module.weight.data
        assert torch.equal(back[f"{name}.weight"], w.to(torch.bfloat16).float())
        differ += int((back[f"{name}.weight"] != w).sum())
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert differ > 0 and ck["mismatched_weights"] == differ and ck["exact"] is False
    assert ck["transformers_reload"] is False
    line = summary_line(ck)
    assert f"{differ} weights not exact (compressed-tensors 0.20 reads NVFP4 back in bfloat16)" in line
    assert "transformers cannot reload it: compressed-tensors 0.20 decompresses FP4 weights into bfloat16" in line


def test_fp8_scales_are_held_in_the_models_dtype_and_what_that_changes_is_counted(tiny_llama, tmp_path):
    """As for integer grids, loaders hold FP8 scales in the model's dtype: a bfloat16 model's float32 scales are
    written in bfloat16 and the weights that changes are counted (and come back so from every reader)."""
    lm, targets = pruned_float_lm(tiny_llama, "fp8", -1, "bfloat16")
    d = save_model(lm, targets, ("magnitude", "rtn"), tmp_path / "m")
    raw, back = load_file(str(d / "model.safetensors")), dequantized(d, torch.bfloat16)
    differ = 0
    for name, t in targets.items():
        assert raw[f"{name}.weight_scale"].dtype == torch.bfloat16
        differ += int((back[f"{name}.weight"] != t.module.weight.data).sum())
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert differ > 0 and ck["mismatched_weights"] == differ and ck["exact"] is False and ck["transformers_reload"]


@pytest.mark.parametrize("fmt,group_size,dtype", [("fp8", 128, "float32"), ("nvfp4", 16, "bfloat16"),
                                                  ("mxfp4", 32, "bfloat16"), ("mxfp4", 32, "float32")])  # fmt: skip
def test_transformers_reloads_float_exports_where_the_sidecar_says(tiny_llama, tmp_path, fmt, group_size, dtype):
    """transformers' from_pretrained decompresses FP8 into the model's dtype (the same logits), FP4 into bfloat16:
    a bfloat16 model runs it to the same logits, a float32 one fails on its first forward, as the line says."""
    from transformers import AutoModelForCausalLM

    lm, targets = pruned_float_lm(tiny_llama, fmt, group_size, dtype)
    d = save_model(lm, targets, ("magnitude", "rtn"), tmp_path / "m")
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype))
    x = torch.arange(1, 33).reshape(1, 32) % lm.model.config.vocab_size
    if not ck["transformers_reload"]:
        with pytest.raises(RuntimeError, match="same dtype"), torch.no_grad():
            model(x)
        assert "transformers cannot reload it" in summary_line(ck)
        return
    with torch.no_grad():
        assert torch.equal(model(x).logits, lm.model(x).logits)
    mods = dict(model.named_modules())
    assert all(torch.equal(mods[n].weight.data, t.module.weight.data) for n, t in targets.items())
    assert "; transformers reloads it" in summary_line(ck)


@pytest.mark.parametrize("fmt,group_size,act,path,reasons", [
    ("fp8", -1, None, "W8A16 FP8", []),
    ("fp8", 128, None, "W8A16 FP8",
     ["FP8 weights in groups of 128 along a row (vLLM's FP8 schemes take per-tensor, per-channel or 128x128-block "
      "scales: group_size=-1)"]),
    ("nvfp4", 16, None, "W4A16 NVFP4", []),
    ("mxfp4", 32, None, "W4A16 MXFP4", []),
    ("fp8", -1, ActScheme(8, "token"), "W8A16 FP8",
     ["integer A8 input activations with float weights (vLLM's float schemes take 16-bit or float activations)"]),
    ("fp8", -1, ActScheme(8, "token", "fp8"), "W8A8 FP8", []),
    ("fp8", -1, ActScheme(8, "tensor", "fp8"), "W8A8 FP8",
     ["dynamic per-tensor FP8 activations (vLLM's W8A8 FP8 takes dynamic per-token or static per-tensor scales)"]),
    ("nvfp4", 16, ActScheme(8, "token", "fp8"), "W4A16 NVFP4",
     ["NVFP4 weights with FP8 activations (vLLM's FP4 schemes take 16-bit or FP4 activations)"]),
])  # fmt: skip
def test_float_servability_is_per_format(tiny_lm, tmp_path, fmt, group_size, act, path, reasons):
    lm, targets, state, dense = tiny_lm
    state.restore(dense)
    float_rtn(targets, fmt, group_size)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m", "compressed-tensors", act=act)
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert ck["vllm"] == {"path": path, "servable": not reasons, "reasons": reasons}
    if act is not None:  # the activations' scheme travels in the config group
        (group,) = qconfig(d)["config_groups"].values()
        assert group["input_activations"]["type"] == ("int" if act.fmt is None else "float")
        assert group["input_activations"]["dynamic"] is True and group["format"] == FLOAT_FORMAT[fmt]
    line = {("fp8", -1): "compressed-tensors float-quantized, FP8 E4M3 per channel; exact; vLLM W8A16 FP8 serves it; "
                         "transformers reloads it; ",
            ("mxfp4", 32): "compressed-tensors mxfp4-pack-quantized, MXFP4 E2M1 group 32, E8M0 scales; exact; vLLM "
                           "W4A16 MXFP4 serves it; transformers cannot reload it: compressed-tensors 0.20 decompresses "
                           "FP4 weights into bfloat16, which only a bfloat16 model runs; "}.get((fmt, group_size))  # fmt: skip
    if line and act is None:
        assert summary_line(ck).startswith(line)
    back = dequantized(d, torch.float32)  # bit for bit but NVFP4 in float32 (read back in bfloat16)
    assert all(torch.equal(back[f"{n}.weight"], t.module.weight.data) for n, t in targets.items()) is (fmt != "nvfp4")
    assert ck["exact"] is (fmt != "nvfp4")


def test_a_float_format_run_saves_compressed_tensors_that_reload_to_its_perplexity(tiny_overrides, tmp_path):
    """format=fp8 with save=true (auto): each order's checkpoint is float-quantized and reloads to its perplexity."""
    over = tiny_overrides + ["format=fp8", "sparsity=0.5", "save=true", "eval.backends=none",
                             "stages=[magnitude,rtn]", "joint=[]"]  # fmt: skip
    cfg = compose_config(over)
    df = run(cfg, tmp_path / "out")
    ppl = df[df["metric"] == "perplexity"].set_index("order")["value"]
    for folder, order in (("magnitude_then_rtn", "magnitude > rtn"), ("rtn_then_magnitude", "rtn > magnitude")):
        d = tmp_path / "out" / "models" / folder
        assert qconfig(d)["format"] == "float-quantized"
        ck = json.loads((d / "compression.json").read_text())["checkpoint"]
        assert ck["exact"] and ck["vllm"]["servable"] and ck["transformers_reload"]
        assert _ppl_of_reload(cfg, d) == ppl[order]


@pytest.mark.parametrize("granularity", ["token", "static"])
def test_a_w8a8_fp8_run_saves_its_fp8_activation_scheme_for_vllms_w8a8_fp8(tiny_overrides, tmp_path, granularity):
    """format=fp8 act_format=fp8 save=true: the checkpoint's config group carries the FP8 input activations the run
    simulated (dynamic per token, or static per tensor with each layer's input_scale), and its line names vLLM's
    W8A8 FP8 scheme."""
    over = tiny_overrides + ["format=fp8", "act_format=fp8", f"act_granularity={granularity}", "save=true",
                             "eval.backends=none", "stages=[rtn]", "joint=[]"]  # fmt: skip
    run(compose_config(over), tmp_path / "out")
    d = tmp_path / "out" / "models" / "rtn"
    (group,) = qconfig(d)["config_groups"].values()
    acts = group["input_activations"]
    static = granularity == "static"
    assert (acts["type"], acts["num_bits"], acts["strategy"], acts["dynamic"]) == \
        ("float", 8, "tensor" if static else "token", not static)  # fmt: skip
    tensors = load_file(str(d / "model.safetensors"))
    scales = [k for k in tensors if k.endswith(".input_scale")]
    assert len(scales) == (len(group["targets"]) if static else 0)
    assert not any(k.endswith(".input_zero_point") for k in tensors)  # float schemes have no zero-points
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert ck["vllm"] == {"path": "W8A8 FP8", "servable": True, "reasons": []}
    how = "static per-tensor" if static else "token-wise dynamic"
    assert f"A8 FP8 E4M3 {how} symmetric activations" in summary_line(ck)


def test_float_quantized_experts_are_stored_dense_on_their_grids_and_said_so(tmp_path):
    """transformers keeps Mixtral's experts as 3-D parameters no compressed-tensors scheme names: with a float
    format they are stored dense, their values exactly on their grids, the attention Linears in the format's
    layout, and the line says how many expert matrices were kept dense."""
    from helpers import save_tiny_moe

    path = save_tiny_moe("Mixtral", tmp_path / "mixtral")
    lm = causal_lm("tiny-mixtral", str(path))
    targets = find_targets(lm.model, lm.skip)
    float_rtn(targets, "mxfp4", 32)
    experts = {n for n, t in targets.items() if t.index is not None}
    assert experts and len(experts) < len(targets)
    d = save_model(lm, targets, ("rtn",), tmp_path / "m")
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert (ck["compression_format"], ck["dense_experts"], ck["exact"]) == ("mxfp4-pack-quantized", len(experts), True)
    assert f"; {len(experts)} quantized expert matrices stored dense (on their grids)" in summary_line(ck)
    (group,) = qconfig(d)["config_groups"].values()
    assert sorted(group["targets"]) == sorted(set(targets) - experts)
    back = dequantized(d, torch.float32)
    for name, t in targets.items():
        if name in experts:
            continue
        assert torch.equal(back[f"{name}.weight"], t.module.weight.data)
    # transformers saves the fused experts as Mixtral's per-expert w1/w2/w3 matrices: dense float32, no scales, each
    # group of 32 inputs holding at most the 15 E2M1 values times its one scale
    raw = load_file(str(d / "model.safetensors"))
    dense = {k: v for k, v in raw.items() if ".experts." in k}
    assert len(dense) == len(experts) // 2 * 3 and all(k.endswith(".weight") for k in dense)
    for v in dense.values():
        assert v.dtype == torch.float32
        assert max(len(torch.unique(g)) for g in v.reshape(-1, 32)) <= 15


def test_save_format_compressed_tensors_with_a_float_format_is_no_longer_refused(tiny_overrides, tmp_path):
    """format=mxfp4 save_format=compressed-tensors (refused with one line before float grids had a writer) runs and
    writes an mxfp4-pack-quantized checkpoint that reads back exactly."""
    from compress_order.cli.main import main

    over = tiny_overrides + ["format=mxfp4", "save=true", "save_format=compressed-tensors", "eval.backends=none",
                             "eval.max_windows=2", "stages=[rtn]"]  # fmt: skip
    assert main(["run", *over]) == 0
    d = tmp_path / "run" / "models" / "rtn"
    ck = json.loads((d / "compression.json").read_text())["checkpoint"]
    assert (ck["compression_format"], ck["exact"], ck["vllm"]["servable"]) == ("mxfp4-pack-quantized", True, True)
    assert summary_line(ck).startswith("compressed-tensors mxfp4-pack-quantized, MXFP4 E2M1 group 32, E8M0 scales; "
                                       "exact; vLLM W4A16 MXFP4 serves it; ")  # fmt: skip


def test_export_from_a_sweep_folder_names_its_jobs(tmp_path, capsys):
    from compress_order.cli.main import main

    for job in ("0", "1"):
        (tmp_path / "sweep" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / job / ".hydra" / "config.yaml").write_text("{}")
    assert main(["export", str(tmp_path / "sweep"), "--order", "magnitude > rtn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is a sweep's folder; export from one of its 2 jobs: {tmp_path / 'sweep' / '0'}" in err[0]


def test_export_to_compressed_tensors_of_an_order_that_quantizes_nothing_is_refused(tmp_path, capsys):
    from omegaconf import OmegaConf

    from compress_order.cli.main import main
    from compress_order.config.compose import compose_config

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config(["stages=[magnitude,wanda]"]), run_dir / ".hydra" / "config.yaml")
    assert main(["export", str(run_dir), "--order", "magnitude > wanda", "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the order magnitude > wanda quantizes nothing; use save_format=dense" in err[0], err
