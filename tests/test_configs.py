"""Every config of every group composes, and everything that can be built offline is built and used.

The groups are globbed, so a new yaml file is tested without touching this file: stages are applied to the
embedded model, models run a forward pass (hub-only ones must fail with a one-line error naming what is
missing), datasets load (from tiny local files where the config reads a folder).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from helpers import settings

from compress_order.config.compose import compose_config
from compress_order.core.instantiate import build
from compress_order.core.errors import UserError
from compress_order.core.paths import CONF_DIR, group_options
from compress_order.run.pipeline import apply_stage
from compress_order.config.stages import build_stage, stage_configs
from compress_order.modeling.targets import ModelState, find_targets
from compress_order.evaluation.tasks import build_task
from compress_order.config.validate import check_config

GROUPS = ["model", "data", "stage", "eval", "experiment", "hydra/launcher"]
LOCAL_PREFIXES = ("/", "./", "../", "~")


def _cases(*groups: str) -> list:
    return [pytest.param(g, n, id=f"{g}={n}") for g in groups for n in group_options(g)]


def test_every_config_folder_is_a_tested_group():
    folders = {p.parent.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")} - {"."}
    assert folders == set(GROUPS)
    assert all(group_options(g) for g in GROUPS)


@pytest.mark.parametrize("group,name", _cases("model", "data", "eval", "experiment"))
def test_group_config_composes_and_passes_checks(group, name):
    cfg = compose_config([f"{group}={name}"])
    try:
        check_config(cfg)
    except UserError as e:  # weights or data not fetched on this machine, or a folder the user gives (image_folder's
        # data.path): refused before any model loads (#41)
        hint = cfg[group].get("missing_hint") if group in ("model", "data") else None
        assert (hint and hint in str(e) and "does not exist" in str(e)) or "set data.path" in str(e), e
    if group in ("model", "data"):
        assert cfg[group]["_target_"].startswith("compress_order.") and cfg[group]["name"]
        get_method(cfg[group]["_target_"])  # the loader exists
    for sc in stage_configs(cfg) + stage_configs(cfg, key="joint"):
        build_stage(sc)


@pytest.mark.parametrize("group,name", _cases("hydra/launcher"))
def test_launcher_config_composes_with_an_installed_plugin(group, name):
    cfg = compose_config([f"{group}={name}"], hydra=True)
    launcher = get_class(cfg.hydra.launcher._target_)
    assert launcher.__module__.startswith("hydra_plugins.")


# ----------------------------------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def embedded():
    """The embedded char-LLaMA with a task over a few short calibration segments."""
    cfg = compose_config(["calibration.nsamples=2", "calibration.seqlen=32", "eval.max_windows=1", "device=cpu"])
    lm = build(cfg.model)
    task = build_task(lm, build(cfg.data), settings(cfg))
    state = ModelState(lm.model, find_targets(lm.model, lm.skip), whole=True)  # a rotation changes embeddings too
    return cfg, task, state, state.snapshot()


@pytest.fixture(scope="module")
def embedded_moe(tmp_path_factory):
    """A tiny Mixtral (fused experts) with the embedded data, for stages that act on MoE layers."""
    from helpers import save_tiny_moe

    ckpt = save_tiny_moe("Mixtral", tmp_path_factory.mktemp("moe") / "ckpt")
    cfg = compose_config([f"model.path={ckpt}", "model.dtype=float32", "calibration.nsamples=2",
                          "calibration.seqlen=32", "eval.max_windows=1", "device=cpu"])  # fmt: skip
    lm = build(cfg.model)
    task = build_task(lm, build(cfg.data), settings(cfg))
    state = ModelState(lm.model, find_targets(lm.model, lm.skip))
    return cfg, task, state, state.snapshot()


@pytest.mark.parametrize("name", group_options("stage"))
def test_stage_config_compresses_the_embedded_model(name, embedded, embedded_moe):
    over = compose_config([f"stages=[{name}]", "bits=4", "sparsity=0.5", "group_size=64"])
    (spec,) = stage_configs(over)
    stage, sc = build_stage(spec), spec.params
    if stage.needs == "routing":  # acts on MoE layers: a tiny Mixtral, whose experts it removes
        cfg, task, state, dense = embedded_moe
        state.restore(dense)
        apply_stage(stage, state, task, settings(cfg).calibration)
        removed = [t for t in state.targets.values() if t.constraint.dropped]
        assert removed and all(t.constraint.applied == [stage.label] and not t.weight.any() for t in removed)
        assert len(removed) == round(sc["expert_sparsity"] * 4) * 2 * 2  # per layer, gate_up and down
        state.restore(dense)
        return
    cfg, task, state, dense = embedded
    assert stage.label == spec.label and stage.kind in ("prune", "quantize", "joint", "transform")
    state.restore(dense)
    apply_stage(stage, state, task, settings(cfg).calibration)  # checks every layer's recorded constraints
    assert not state.equal(dense)
    if stage.whole_model and stage.kind == "prune":  # removes whole blocks (sleb): their layers are gone, the rest kept
        removed = [t for t in state.targets.values() if t.constraint.dropped]
        assert removed and all(t.constraint.applied == [stage.label] and not t.weight.any() for t in removed)
        assert all(not t.constraint.applied for t in state.targets.values() if not t.constraint.dropped)
        assert len(state.blocks.kept) == len(state.blocks.original) - round(sc["blocks"] * len(state.blocks.original))
        state.restore(dense)
        assert not state.blocks.removed and state.equal(dense)
        return
    for t in state.targets.values():
        c = t.constraint
        assert c.applied == [stage.label]
        if stage.kind in ("prune", "joint"):
            want = 0.5 if sc.get("nm") is None else 1 - int(sc["nm"].split(":")[0]) / int(sc["nm"].split(":")[1])
            assert c.mask is not None and (t.weight == 0).float().mean().item() >= want - 1e-6
        if stage.kind in ("quantize", "joint"):
            assert c.grid is not None
            if "bits" in sc and sc.get("budget") is None and not sc.get("bits_map"):
                assert stage.bits == 4  # ${bits} reached the stage
                assert all(len(torch.unique(row)) <= 2**4 + 1 for row in t.weight[:, :64])  # + the pruned 0
    with torch.no_grad():
        ids = torch.arange(16).unsqueeze(0) % state.model.config.vocab_size
        assert torch.isfinite(state.model(ids).logits).all()
    state.restore(dense)


# ----------------------------------------------------------------------------------------------------- models


def _hub_only(node: DictConfig) -> str | None:
    """The hub id a causal-LM config loads from when it names no local path (None: it is local)."""
    path = str(node.get("path") or "")
    if node._target_.endswith(".causal_lm") and not path.startswith(LOCAL_PREFIXES) and not os.path.exists(path):
        return path
    return None


def _offline_overrides(node: DictConfig) -> list[str]:
    """timm configs that download pretrained weights get random ones instead (same architecture)."""
    if node.get("pretrained") and not node.get("checkpoint"):
        return ["model.pretrained=false"]
    return []


# the real GGUF checkpoints (where their files are) take 25-80 s to load on 2 cores: in the slow suite
REAL_GGUF = ("gemma3_270m", "smollm2")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in REAL_GGUF else [])
                                  for n in group_options("model")])  # fmt: skip
def test_model_config_builds_and_runs_a_forward_pass(name):
    node = compose_config([f"model={name}"]).model
    hub = _hub_only(node)
    missing = node.get("gguf_file") and not os.path.exists(os.path.join(node.path, node.gguf_file))
    if hub or missing:  # no weights offline: a one-line error naming what is missing
        with pytest.raises(UserError) as e:
            build(node)
        msg = str(e.value)
        assert "\n" not in msg and f"model '{node.name}'" in msg
        assert (hub or os.path.join(node.path, node.gguf_file)) in msg
        if missing and node.get("missing_hint"):
            assert node.missing_hint in msg
        return
    if _offline_overrides(node):  # the pretrained download fails offline with a one-line error
        with pytest.raises(UserError, match=f"cannot get pretrained {node.arch} weights.*model.checkpoint="):
            build(node)
    node = compose_config([f"model={name}", *_offline_overrides(node)]).model
    lm = build(node)
    assert not lm.model.training
    with torch.no_grad():
        if lm.kind == "causal_lm":
            ids = lm.tokenizer("To be, or not to be", return_tensors="pt").input_ids
            out = lm.model(ids).logits
            assert out.shape[:2] == ids.shape and out.shape[2] >= len(lm.tokenizer) - 1
        else:
            x = torch.randn(1, *lm.extra["data_config"]["input_size"])
            out = lm.model(x)
            assert out.shape == (1, lm.extra["num_classes"])
    assert torch.isfinite(out).all()
    assert find_targets(lm.model, lm.skip), "no compressible layer"


# ------------------------------------------------------------------------------------------------------- data


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def local_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny local stand-ins for configs that read a folder: IDX files and class sub-folders of images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (root / "idx").mkdir()
    for stem, shape in [("train-images-idx3-ubyte", (6, 28, 28)), ("train-labels-idx1-ubyte", (6,)),
                        ("t10k-images-idx3-ubyte", (4, 28, 28)), ("t10k-labels-idx1-ubyte", (4,))]:  # fmt: skip
        _write_idx(root / "idx" / f"{stem}.gz", rng.integers(0, 10 if len(shape) == 1 else 256, shape))
    for split in ("train", "val"):
        for c in range(2):
            (root / "images" / split / f"class{c}").mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    root / "images" / split / f"class{c}" / f"{i}.png"
                )
    return {"root": root / "idx", "path": root / "images"}


def _data_offline(node: DictConfig, local_files: dict[str, Path]) -> tuple[list[str], str | None]:
    """Overrides that point a data config at local files, and the hub id it needs when it cannot be local."""
    if "root" in node and not node.root:
        return [f"data.root={local_files['root']}"], None
    if node._target_.endswith(".hf_images") and not str(node.path or "").startswith(LOCAL_PREFIXES):
        if node.path:
            return [], str(node.path)
        return [f"data.path={local_files['path']}"], None
    if node._target_.endswith(".hf_text") and not node.path:
        return [], str(node.dataset)
    return [], None


@pytest.mark.parametrize("name", group_options("data"))
def test_data_config_loads(name, local_files):
    node = compose_config([f"data={name}"]).data
    over, hub = _data_offline(node, local_files)
    if hub:  # the hub is offline: a one-line error naming the dataset and how to pass local files
        with pytest.raises(UserError) as e:
            build(node)
        msg = str(e.value)
        assert "\n" not in msg and f"data '{node.name}'" in msg and hub in msg and "data.path=" in msg
        return
    data = build(compose_config([f"data={name}", *over]).data)
    assert data.name == node.name
    if hasattr(data, "valid"):
        assert data.train.strip() and data.valid.strip()
    else:
        assert len(data.test) > 0 and len(data.train) > 0
        assert data.test_labels is None or len(data.test_labels) == len(data.test)
        assert np.asarray(data.test[0]).size > 0


# ----------------------------------------------------------------------------------------------------- others


def test_default_config_is_the_order_experiment():
    cfg = compose_config([])
    assert list(cfg.stages) == ["magnitude", "rtn"] and cfg.bits == 3 and cfg.sparsity == 0.7
    assert cfg.model.name == "charllama" and cfg.data.name == "shakespeare"


def test_stage_entry_with_overrides_gets_its_own_label():
    cfg = compose_config(["stages=[{name:magnitude,sparsity:0.3},rtn,magnitude]"])
    labels = [sc.label for sc in stage_configs(cfg)]
    assert labels == ["magnitude(sparsity=0.3)", "rtn", "magnitude"]
    assert stage_configs(cfg)[0].params["sparsity"] == 0.3 and stage_configs(cfg)[2].params["sparsity"] == 0.7


def test_llama_config_loads_from_a_local_dir(tiny_llama):
    cfg = compose_config(["model=llama", f"model.path={tiny_llama}", "model.dtype=float32"])
    lm = build(cfg.model)
    assert lm.kind == "causal_lm" and type(lm.model).__name__ == "LlamaForCausalLM"


def test_a_saved_config_of_the_flat_layout_loads_through_todays_modules(tmp_path):
    """Run folders written before the sub-package move name `compress_order.models.causal_lm` and the like."""
    from compress_order.config.compose import load_saved

    cfg = compose_config([])
    old = OmegaConf.to_yaml(cfg).replace("compress_order.loaders.models.", "compress_order.models.")
    old = old.replace("compress_order.loaders.text.", "compress_order.data.")
    assert "compress_order.models.causal_lm" in old and "compress_order.data." in old
    (tmp_path / "config.yaml").write_text(old)
    saved = load_saved(tmp_path / "config.yaml")
    assert saved.model._target_ == cfg.model._target_ and saved.data._target_ == cfg.data._target_
    assert OmegaConf.to_container(saved, resolve=True) == OmegaConf.to_container(cfg, resolve=True)
    assert build(saved.data).name == cfg.data.name
