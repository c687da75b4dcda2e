"""Vision: configs compose, timm loading and its errors, image datasets, stages on convolutions in both orders,
an end-to-end run on a tiny timm model, and the shipped MNIST model's recorded accuracy."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from helpers import exit_code, settings

from compress_order.config.compose import compose_config
from compress_order.core.instantiate import build
from compress_order.core.errors import UserError
from compress_order.core.paths import ASSETS_DIR, CONF_DIR
from compress_order.stages.calibration import calibrate_and_compress
from compress_order.modeling.hessian import HessianStats
from compress_order.run.pipeline import apply_stage
from helpers import run
from compress_order.config.stages import build_stage, stage_configs
from compress_order.stages.base import Stage
from compress_order.modeling.targets import ModelState, find_targets
from compress_order.evaluation.tasks import build_task
from compress_order.config.validate import check_config
from compress_order.loaders.image_data import ImageSplits, fashion_mnist, hf_images, read_idx

MODELS = ["resnet18", "deit_base", "vit_small", "mnist_resnet"]
DATA = ["imagenet", "mnist", "fashion_mnist", "image_folder"]
TINY_KWARGS = {"layers": [1, 1, 1, 1], "channels": [32, 32, 32, 32]}
NODE_METRICS = {"top1", "top5", "nll", "sparsity", "avg_bits", "size_bytes", "latency_ms", "latency_ms_iqr",
                "images_per_s"}  # fmt: skip
STAGE_DIR = CONF_DIR / "stage"


@pytest.mark.parametrize("group,name", [("model", m) for m in MODELS] + [("data", d) for d in DATA])
def test_vision_configs_compose(group, name, tmp_path):
    cfg = compose_config([f"{group}={name}"])
    if name == "image_folder":  # data.path is the user's to give: refused without it, before any model loads (#41)
        with pytest.raises(UserError, match="set data.path"):
            check_config(cfg)
        cfg = compose_config([f"{group}={name}", f"data.path={tmp_path}"])
    check_config(cfg)
    assert cfg[group]["_target_"].startswith(("compress_order.loaders.image_models.", "compress_order.loaders.image_data."))


def test_vision_experiment_is_the_embedded_model_on_mnist():
    cfg = compose_config(["experiment=vision"])
    check_config(cfg)
    assert cfg.model.name == "mnist-resnet" and cfg.data.name == "mnist" and cfg.group_size == -1
    record = json.loads((ASSETS_DIR / "mnist_model" / "model.json").read_text())
    m = cfg.model  # the yaml builds exactly what the script trained
    assert (m.arch, dict(m.kwargs), m.num_classes, m.in_chans) == (
        record["arch"], record["kwargs"], record["num_classes"], record["in_chans"])  # fmt: skip
    assert dict(m.data_config) == record["data_config"]
    assert (cfg.data.test_size, cfg.data.split_seed) == (record["data"]["test_size"], record["data"]["split_seed"])
    assert Path(m.checkpoint).stat().st_size == record["bytes"] < 5_000_000


# ---------------------------------------------------------------------------------------------------------
# A tiny timm model saved like a real checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10, **TINY_KWARGS)
    path = tmp_path_factory.mktemp("tiny_timm") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture
def vision_overrides(tiny_ckpt, tmp_path) -> list[str]:
    return [
        "model=mnist_resnet", f"model.checkpoint={tiny_ckpt}", "model.name=tiny-resnet",
        f"model.kwargs.channels={TINY_KWARGS['channels']}", "data=mnist", "data.test_size=40",
        "calibration.nsamples=16", "eval.batch_size=20", "eval.latency.batch=4", "eval.latency.repeats=2",
        "eval.latency.warmup=1", f"store_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "threads=1", "bits=4", "sparsity=0.5",
    ]  # fmt: skip


def test_run_on_a_tiny_timm_model_writes_tidy_rows(vision_overrides, tmp_path):
    df = run(compose_config(vision_overrides + ["stages=[magnitude,rtn]", "group_size=32"]), tmp_path / "out")
    disk = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(disk) == len(df)
    assert set(disk["order"]) == {"dense", "magnitude", "rtn", "magnitude > rtn", "rtn > magnitude"}
    assert disk.groupby("order")["metric"].apply(set).map(lambda s: NODE_METRICS <= s).all()
    v = disk.pivot_table(index="order", columns="metric", values="value", aggfunc="first")
    assert v.loc["dense", "sparsity"] == 0 and v.loc["magnitude > rtn", "sparsity"] >= 0.5
    assert ((v["top1"] >= 0) & (v["top1"] <= v["top5"]) & (v["top5"] <= 100)).all()
    samples = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    dense = samples[samples["order"] == "dense"]
    correct, nll = dense[dense["metric"] == "correct"]["value"], dense[dense["metric"] == "nll"]["value"]
    assert len(correct) == len(nll) == 40 and set(correct) <= {0.0, 1.0}
    assert abs(100 * correct.mean() - v.loc["dense", "top1"]) < 1e-9 and abs(nll.mean() - v.loc["dense", "nll"]) < 1e-9
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "top1: 40 images of held-out MNIST" in summary and "28×28" in summary


# ---------------------------------------------------------------------------------------------------------
# Stages on convolutions: every promise kept, in both orders


def _pairs() -> list[tuple[str, str]]:
    have = {p.stem for p in STAGE_DIR.glob("*.yaml")}
    pairs = [("magnitude", "rtn")] + [p for p in [("wanda", "gptq"), ("sparsegpt", "gptq")] if set(p) <= have]
    return pairs + [(b, a) for a, b in pairs]


@pytest.mark.parametrize("first,second", _pairs(), ids=lambda s: s)
def test_conv_stages_keep_every_constraint_in_both_orders(first, second, tiny_ckpt):
    bits, sparsity = 3, 0.5
    cfg = compose_config([
        "model=mnist_resnet", f"model.checkpoint={tiny_ckpt}", f"model.kwargs.channels={TINY_KWARGS['channels']}",
        "data=mnist", "data.test_size=20", "calibration.nsamples=8", "eval.batch_size=8", "device=cpu",
        f"stages=[{first},{second}]", f"bits={bits}", f"sparsity={sparsity}", "group_size=32",
    ])  # fmt: skip
    lm, data = build(cfg.model), build(cfg.data)
    targets = find_targets(lm.model, lm.skip)
    assert "conv1" not in targets and "fc" not in targets  # first conv and classifier dense by default
    assert all(isinstance(t.module, nn.Conv2d) for t in targets.values()) and len(targets) == 12
    dense = {n: t.module.weight.detach().clone() for n, t in targets.items()}
    skipped = lm.model.conv1.weight.detach().clone(), lm.model.fc.weight.detach().clone()
    state, task = ModelState(lm.model, targets), build_task(lm, data, settings(cfg))
    stages = [build_stage(sc) for sc in stage_configs(cfg)]
    for s in stages:
        apply_stage(s, state, task, settings(cfg).calibration)  # checks every layer's invariants after each stage
    for n, t in targets.items():
        w, c = t.weight, t.constraint
        assert t.module.weight.shape == dense[n].shape and w.shape == (dense[n].shape[0], dense[n][0].numel())
        assert c.applied == [s.label for s in stages]
        assert int((w == 0).sum()) >= round(sparsity * w.numel())
        assert torch.all(w[~c.mask] == 0) and torch.equal(c.grid.project(w), w) and c.grid.bits == bits
        assert not torch.equal(t.module.weight, dense[n])
    assert torch.equal(lm.model.conv1.weight, skipped[0]) and torch.equal(lm.model.fc.weight, skipped[1])
    metrics, _ = task.evaluate(lm.model)
    assert np.isfinite(metrics["nll"])


class _Record(Stage):
    """A calibrated 'stage' that only keeps the statistics the driver hands each layer."""

    kind, needs = "prune", "hessian"

    def __init__(self) -> None:
        super().__init__(name="record")
        self.H: dict[str, torch.Tensor] = {}

    def compress(self, target, stats=None) -> None:
        self.H[target.name] = stats.H.clone()


def test_calibrated_conv_statistics_are_each_layers_own_patches(tiny_ckpt):
    """Every conv gets H of its own unfolded input, also where two convs read the same tensor with different
    kernels (a ResNet block's 3×3 conv1 and its 1×1 downsample)."""
    cfg = compose_config(["model=mnist_resnet", f"model.checkpoint={tiny_ckpt}", "data=mnist", "data.test_size=20",
                          f"model.kwargs.channels={TINY_KWARGS['channels']}", "calibration.nsamples=8",
                          "eval.batch_size=4", "device=cpu"])  # fmt: skip
    lm, data = build(cfg.model), build(cfg.data)
    targets = find_targets(lm.model, lm.skip)
    batches = build_task(lm, data, settings(cfg)).calibration_batches()
    want = {n: HessianStats(t.module, "cpu") for n, t in targets.items()}
    hooks = [t.module.register_forward_pre_hook(lambda m, a, n=n: want[n].add_batch(a[0])) for n, t in targets.items()]
    with torch.no_grad():
        for x in batches:
            lm.model(x)
    for h in hooks:
        h.remove()
    rec = _Record()
    calibrate_and_compress(lm.model, targets, batches, rec, settings(cfg).calibration)
    for n, t in targets.items():
        assert rec.H[n].shape == (t.shape[1], t.shape[1]), n
        torch.testing.assert_close(rec.H[n], want[n].H, rtol=1e-4, atol=1e-6, msg=n)


def test_calibration_images_are_seeded_and_shared(tiny_ckpt):
    overrides = ["model=mnist_resnet", f"model.checkpoint={tiny_ckpt}",
                 f"model.kwargs.channels={TINY_KWARGS['channels']}", "data=mnist", "data.test_size=20",
                 "calibration.nsamples=10", "eval.batch_size=4", "device=cpu"]  # fmt: skip
    cfg = compose_config(overrides)
    lm, data = build(cfg.model), build(cfg.data)
    a, b = build_task(lm, data, cfg), build_task(lm, data, settings(cfg))
    ca, cb = a.calibration_batches(), b.calibration_batches()
    assert [x.shape for x in ca] == [(4, 1, 28, 28), (4, 1, 28, 28), (2, 1, 28, 28)]
    assert all(torch.equal(x, y) for x, y in zip(ca, cb)) and a.calibration_batches() is ca
    other = build_task(lm, data, settings(compose_config(overrides + ["seed=1"]))).calibration_batches()
    assert not torch.equal(other[0], ca[0])


# ---------------------------------------------------------------------------------------------------------
# Datasets


def test_mnist_split_is_fixed_stratified_and_disjoint():
    cfg = compose_config(["data=mnist"])
    d1, d2 = build(cfg.data), build(cfg.data)
    assert isinstance(d1, ImageSplits) and len(d1.test) == 1000 and len(d1.train) == 4000
    assert np.bincount(d1.test_labels).tolist() == [100] * 10 and np.array_equal(d1.test_labels, d2.test_labels)
    train = {d1.train.array[i].tobytes() for i in range(len(d1.train))}
    assert sum(d1.test.array[i].tobytes() in train for i in range(len(d1.test))) < 5  # (MNIST has a few duplicates)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_and_explains_how_to_install(tmp_path):
    rng = np.random.default_rng(0)
    for stem, shape in [("train-images-idx3-ubyte", (30, 28, 28)), ("train-labels-idx1-ubyte", (30,)),
                        ("t10k-images-idx3-ubyte", (12, 28, 28)), ("t10k-labels-idx1-ubyte", (12,))]:  # fmt: skip
        _write_idx(tmp_path / f"{stem}.gz", rng.integers(0, 10 if len(shape) == 1 else 256, shape))
    d = fashion_mnist(root=str(tmp_path))
    assert len(d.train) == 30 and len(d.test) == 12 and d.num_classes == 10 and d.classes[9] == "Ankle boot"
    assert np.array_equal(d.test_labels, read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"))
    assert d.test[0].size == (28, 28)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and val/ folders of 10 digit classes (so the tiny MNIST model fits), plus a flat unlabelled one."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 2)):
        for c in range(10):
            (root / "ds" / split / f"digit{c}").mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
                img.save(root / "ds" / split / f"digit{c}" / f"{i}.png")
    (root / "flat").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "flat" / f"{i}.png")
    return root


def test_image_folder_splits_labels_and_holdout(image_folder):
    d = hf_images("folder", str(image_folder / "ds"))
    assert len(d.test) == 20 and len(d.train) == 20 and d.num_classes == 10 and d.classes[3] == "digit3"
    assert sorted(d.test_labels.tolist()) == sorted(list(range(10)) * 2)
    h = hf_images("folder", str(image_folder / "ds"), test_split="train", calibration_split=None, holdout=0.25)
    assert len(h.train) == 5 and len(h.test) == 15 and len(h.test_labels) == 15
    flat = hf_images("flat", str(image_folder / "flat"), test_split="train", calibration_split=None)
    assert flat.test_labels is None
    with pytest.raises(UserError, match="has no 'validation' split"):
        hf_images("flat", str(image_folder / "flat"))


def test_vit_on_an_rgb_image_folder_with_calibrated_stages(image_folder, tmp_path):
    """A (tiny) ViT from a checkpoint whose class count is read from its head, grayscale files fed as RGB through
    timm's resize-and-crop, patch embedding and head left dense, Wanda and GPTQ in both orders."""
    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=10, **vit)
    ckpt = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    kwargs = "{" + ",".join(f"{k}:{v}" for k, v in vit.items()) + "}"
    cfg = compose_config([
        "model=vit_small", f"model.checkpoint={ckpt}", f"model.kwargs={kwargs}",
        "model.data_config={input_size:[3,32,32],crop_pct:0.875}",
        "data=image_folder", f"data.path={image_folder / 'ds'}", "stages=[wanda,gptq]", "bits=4", "sparsity=0.5",
        "group_size=32", "calibration.nsamples=8", "eval.batch_size=8", "eval.latency.repeats=1",
        "eval.latency.warmup=0", f"store_dir={tmp_path / 'store'}", "threads=1",
    ])  # fmt: skip
    df = run(cfg, tmp_path / "out")
    v = df.pivot_table(index="order", columns="metric", values="value", aggfunc="first")
    assert set(v.index) == {"dense", "wanda", "gptq", "wanda > gptq", "gptq > wanda"}
    assert v.loc["wanda > gptq", "sparsity"] >= 0.5 and v["top1"].notna().all()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "20 images of imagefolder 'validation'" in summary and "32×32" in summary and "crop_pct=0.875" in summary
    targets = find_targets(build(cfg.model).model, cfg.model.skip)
    assert not any(n.startswith(("patch_embed", "head")) for n in targets) and len(targets) == 8


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2



def _bad(args: list[str], message: str, capsys, tmp_path) -> None:
    out = [f"store_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", "threads=1", "group_size=-1"]
    rc = exit_code(["run", *args, *out])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "results.parquet").exists()


def test_unknown_arch_suggests_close_names(capsys, tmp_path):
    _bad(["model=resnet18", "model.arch=resnet81"], "timm has no architecture 'resnet81'; did you mean: resnet18",
         capsys, tmp_path)  # fmt: skip


@pytest.mark.parametrize("arch,family,close", [("resnett", "resnet", None), ("vit-tiny", "vit_", "vit_tiny_patch16_224")])
def test_unknown_arch_names_the_families_close_by_prefix(arch, family, close, capsys, tmp_path):
    _bad(["model=resnet18", f"model.arch={arch}"], f"families named alike: {family}", capsys, tmp_path)
    if close:  # the nearest family's own names come first
        _bad(["model=resnet18", f"model.arch={arch}"], close, capsys, tmp_path)


def test_classifier_and_dataset_class_mismatch(image_folder, tiny_ckpt, capsys, tmp_path):
    torch.manual_seed(0)
    five = timm.create_model("resnet18", in_chans=1, num_classes=5, **TINY_KWARGS)
    ckpt = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in five.state_dict().items()}, ckpt)
    # num_classes left null: read from the checkpoint (5), then refused against MNIST's 10
    args = ["model=mnist_resnet", f"model.checkpoint={ckpt}", "model.num_classes=null",
            f"model.kwargs.channels={TINY_KWARGS['channels']}", "data=mnist"]  # fmt: skip
    _bad(args, "predicts 5 classes but data 'mnist' has 10", capsys, tmp_path)
    # a checkpoint that does not fit the architecture asked for
    # (with image data: a text dataset for an image classifier is refused first, before the model loads)
    _bad(["model=mnist_resnet", "data=mnist", f"model.checkpoint={tiny_ckpt}"], "does not fit resnet18", capsys, tmp_path)


def test_unlabelled_dataset_and_missing_weights(image_folder, tiny_ckpt, capsys, tmp_path):
    tiny = ["model=mnist_resnet", f"model.checkpoint={tiny_ckpt}",
            f"model.kwargs.channels={TINY_KWARGS['channels']}"]  # fmt: skip
    folder = ["data=image_folder", f"data.path={image_folder / 'flat'}", "data.test_split=train",
              "data.calibration_split=null"]  # fmt: skip
    _bad(tiny + folder, "has no labels", capsys, tmp_path)
    missing = "checkpoint '/no/such.safetensors' does not exist"
    _bad(["model=resnet18", "model.checkpoint=/no/such.safetensors"], missing, capsys, tmp_path)
    _bad(["model=resnet18", "data=mnist"], "cannot get pretrained resnet18 weights", capsys, tmp_path)  # offline
    _bad(["model=mnist_resnet", "data=imagenet"], "cannot load split 'validation' of 'ILSVRC/imagenet-1k'", capsys,
         tmp_path)  # fmt: skip
    _bad(tiny + ["data=image_folder"], "set data.path", capsys, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The shipped model


def test_shipped_model_matches_its_recorded_accuracy():
    record = json.loads((ASSETS_DIR / "mnist_model" / "model.json").read_text())
    cfg = compose_config(["experiment=vision", "device=cpu"])
    lm, data = build(cfg.model), build(cfg.data)
    metrics, samples = build_task(lm, data, settings(cfg)).evaluate(lm.model)
    assert len(samples["correct"]) == record["data"]["test_images"] == 1000
    assert abs(metrics["top1"] - record["test_top1"]) <= 0.2 and metrics["top1"] > 97
    assert abs(metrics["nll"] - record["test_nll"]) <= 2e-3
