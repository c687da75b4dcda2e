"""Vision families as a tested matrix: timm architectures built by name (`model=timm model.arch=...`) with random
weights at a 32×32 input, on the embedded MNIST digits (grayscale repeated to RGB, resized by timm's transform),
run every order of a data-free and a calibrated prune+quantize pair end to end. Checked independently of the
runner after every stage application: every Conv2d/Linear but timm's stem conv and classifier is a target and
keeps its sparsity and grid; those two stay untouched. Settings a layer cannot take (a group size or N:M group
that does not divide its fan-in, e.g. a depthwise conv's 9 columns) are one-line errors before any work.

docs/families.md's coverage table is generated from these records and test_families.py's (scripts/family_table.py).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import FAMILIES, MOE_FAMILIES, settings

from compress_order.cli.main import main
from compress_order.config.compose import compose_config
from compress_order.core.errors import UserError
from matrix_report import kinds, record

SIZE, BITS, SPARSITY = 32, 4, 0.5
# timm name → create_model kwargs for the small input (a ViT's position table is sized by img_size)
ARCHS: dict[str, dict] = {
    "resnet18": {},
    "mobilenetv3_small_100": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": SIZE},
    "deit_tiny_patch16_224": {"img_size": SIZE},
}
PAIRS = {"magnitude,rtn": ("magnitude", "rtn"), "wanda,gptq": ("wanda", "gptq")}
PRUNERS, QUANTIZERS = {"magnitude", "wanda"}, {"rtn", "gptq"}
# GPTQ on resnet18's 4608-column 3×3 convs: ~25 s on one core; efficientnet and deit (10-14 s each) have their
# kind in the fast suite (mobilenetv3's depthwise convs, vit_tiny's blocks)
SLOW = {("resnet18", "wanda,gptq"), ("efficientnet_b0", "wanda,gptq"), ("deit_tiny_patch16_224", "wanda,gptq")}
FAMILIES_DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"  # the coverage table, linked from README.md


def overrides(arch: str, tmp: Path) -> list[str]:
    kw = ARCHS[arch]
    extra = ["model.kwargs={" + ",".join(f"{k}:{v}" for k, v in kw.items()) + "}"] if kw else []
    return [
        "model=timm", f"model.arch={arch}", "model.pretrained=false", "model.num_classes=10",
        f"model.data_config={{input_size:[3,{SIZE},{SIZE}],crop_pct:1.0}}", *extra,
        "data=mnist", "eval.max_examples=16", "calibration.nsamples=8", "eval.batch_size=8", "eval.backends=none",
        "eval.latency.warmup=0", "eval.latency.repeats=1", "device=cpu", "threads=1",
        f"bits={BITS}", f"sparsity={SPARSITY}", "group_size=-1", f"store_dir={tmp / 'store'}",
        f"hydra.run.dir={tmp / 'run'}", f"hydra.sweep.dir={tmp / 'sweep'}",
    ]  # fmt: skip


def io_names(model: nn.Module) -> set[str]:
    """timm's own names of the stem conv and classifier (left dense by the generic config)."""
    cfg = model.pretrained_cfg
    return {cfg["first_conv"], cfg["classifier"]}


def compressible(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear but the stem conv and classifier: what must be compressed."""
    skip = io_names(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip}


def fan_in(m: nn.Module) -> int:
    return m.weight[0].numel()  # Linear: in; Conv2d: in/groups·kh·kw


def _check_layer(name: str, m: nn.Module, applied: list[str]) -> None:
    w = m.weight.detach().reshape(m.weight.shape[0], -1)
    if PRUNERS & set(applied):
        assert int((w == 0).sum()) >= round(SPARSITY * w.numel()), (name, applied)
    if QUANTIZERS & set(applied):  # per output channel (group_size=-1): at most 2^bits values in a row
        worst = max(len(torch.unique(row)) for row in w)
        assert worst <= 2**BITS, (name, applied, worst)


def _case(arch: str, pair: str):
    marks = [pytest.mark.slow] if (arch, pair) in SLOW else []
    return pytest.param(arch, pair, id=f"{arch}-{pair}", marks=marks)


@pytest.mark.parametrize("arch,pair", [_case(a, p) for a in ARCHS for p in PAIRS])
def test_vision_family_runs_every_order_and_keeps_every_constraint(arch, pair, tmp_path, monkeypatch, caplog):
    import compress_order.run.pipeline as pipeline
    import compress_order.run.runner as runner

    first, second = PAIRS[pair]
    real_apply = pipeline.apply_stage
    seen: dict = {"applied": [], "io": None}

    def checked(stage, state, task, cfg, *rest) -> str | None:
        model = state.model
        if seen["io"] is None:  # first application: the weights are still dense
            want = compressible(model)
            assert set(state.targets) == set(want), (arch, set(want) ^ set(state.targets))
            seen["io"] = {n: model.get_submodule(n).weight.detach().clone() for n in io_names(model)}
            seen["layers"], seen["model"] = kinds(want.values()), model
        why = real_apply(stage, state, task, cfg, *rest)
        assert why is None, why
        for name, t in state.targets.items():
            assert t.constraint.applied and t.constraint.applied[-1] == stage.label, name
            _check_layer(name, t.module, t.constraint.applied)
        seen["applied"].append(stage.label)
        return why

    monkeypatch.setattr(pipeline, "apply_stage", checked)
    cfg = compose_config(overrides(arch, tmp_path) + [f"stages=[{pair}]"])
    with caplog.at_level(logging.INFO, logger="compress_order"):
        df = runner.run(settings(cfg), tmp_path / "out")

    assert sorted(seen["applied"]) == sorted([first, second] * 2)  # a, a>b, b, b>a: 4 applications
    orders = {"dense", first, second, f"{first} > {second}", f"{second} > {first}"}
    assert set(df["order"]) == orders
    v = df[df.backend == "dense-simulated"].pivot_table(index="order", columns="metric", values="value")
    assert all(math.isfinite(x) for x in v[["top1", "top5", "nll", "peak_mem_mb"]].to_numpy().ravel()), v
    assert ((v["top1"] >= 0) & (v["top1"] <= v["top5"]) & (v["top5"] <= 100)).all()
    for order in orders - {"dense", second if second in QUANTIZERS else first}:
        assert v.loc[order, "sparsity"] >= SPARSITY - 1e-9, (order, v.loc[order, "sparsity"])
    assert v.loc["dense", "sparsity"] == 0
    model = seen["model"]  # the stem conv and classifier of the last state are still the dense ones
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in seen["io"].items())

    blocks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoder blocks")]
    record("vision", arch, f"timm `{arch}`, random weights, {SIZE}×{SIZE} input", seen["layers"],
           sorted(seen["io"]), blocks[0].removeprefix("decoder blocks: ") if blocks else "",
           [f"{first} > {second}", f"{second} > {first}"])  # fmt: skip


# ------------------------------------------------------------------------------------------ settings a layer refuses

SETTINGS = {  # override → the fan-in divisor each compressed layer needs
    "group_size=32": ("stages=[rtn]", "group_size=32", 32),
    "2:4": ('stages=[{name:magnitude,nm:"2:4"}]', "group_size=-1", 4),
}


class _Reached(Exception):
    """The run got past every stage's check to building the task: no layer refused the setting."""


@pytest.mark.parametrize("arch", list(ARCHS))
def test_settings_a_layer_cannot_take_are_one_line_before_any_work(arch, tmp_path, monkeypatch):
    """A depthwise 3×3 conv has 9 columns per row: no group of 32 or 4 fits. The run names the layer and why in
    one line before evaluating or compressing anything; an architecture whose layers all fit gets past the check."""
    import compress_order.run.pipeline as pipeline
    import compress_order.run.runner as runner

    def reached(*a, **k):
        raise _Reached

    def no_work(*a, **k):
        raise AssertionError("a stage was applied before the setting was checked")

    monkeypatch.setattr(pipeline, "build_task", reached)
    monkeypatch.setattr(pipeline, "apply_stage", no_work)
    model = None
    for name, (stages, group, divisor) in SETTINGS.items():
        cfg = compose_config(overrides(arch, tmp_path) + [stages, group])
        if model is None:
            model = pipeline.build(settings(cfg).model.node()).model
        refusing = [n for n, m in compressible(model).items() if fan_in(m) % divisor]
        if not refusing:
            with pytest.raises(_Reached):
                runner.run(settings(cfg), tmp_path / name)
            continue
        with pytest.raises(UserError) as e:
            runner.run(settings(cfg), tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and "divide" in msg, msg
        named = [n for n in refusing if re.search(rf"\b{re.escape(n)}\b", msg)]
        assert named, (name, msg, refusing[:3])  # the layer is named
        assert str(divisor) in msg


# ------------------------------------------------------------------------------------------ any timm name


def test_an_unknown_timm_architecture_is_one_line_with_close_names(capsys):
    assert main(["validate", "model=timm", "model.arch=convnxt_atto", "model.pretrained=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'convnxt_atto'" in err and "convnext_atto" in err, err


def test_the_generic_timm_config_leaves_timm_io_layers_dense():
    from compress_order.core.instantiate import build
    from compress_order.modeling.targets import find_targets

    for arch in ("convnext_atto", "deit_tiny_distilled_patch16_224"):  # a distilled model has two classifiers
        lm = build(compose_config(["model=timm", f"model.arch={arch}", "model.pretrained=false"]).model)
        assert lm.name == arch
        left = {n for n, m in lm.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))} - set(
            find_targets(lm.model, lm.skip))
        cfg = lm.model.pretrained_cfg
        classifiers = [cfg["classifier"]] if isinstance(cfg["classifier"], str) else list(cfg["classifier"])
        assert left == {cfg["first_conv"], *classifiers}, left


def test_readme_coverage_table_lists_every_family_of_the_matrices():
    text = FAMILIES_DOC.read_text()
    start, end = "<!-- family-matrix:start", "<!-- family-matrix:end -->"
    assert start in text and end in text
    intro, rest = text.split(start, 1)
    assert "`python scripts/family_table.py`" in intro.rsplit("\n\n", 2)[-2]  # the command beside the table
    table = rest.split(end, 1)[0]
    rows = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    from test_real_families import REAL  # the two real checkpoints (their rows come from a machine with the files)

    assert sorted(rows) == sorted([*FAMILIES, *MOE_FAMILIES, *ARCHS, *REAL.values()]), rows
