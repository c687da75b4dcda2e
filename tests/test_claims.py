"""A row claims what was done, no more (issue #41): each test reads the rows of a named run."""

from __future__ import annotations

from helpers import run

from compress_order.config.compose import compose_config


def _sim(df, metric: str):
    ok = df[(df["backend"] == "dense-simulated") & (df["status"] == "ok") & (df["metric"] == metric)]
    return ok.set_index("order")["value"]


def test_a_transform_alone_claims_no_coverage(tiny_overrides, tmp_path):
    """smoothquant rescales and compresses nothing: its node once reported coverage 1.0 at 16 bits, 0% sparse."""
    cfg = compose_config(tiny_overrides + ["format=nvfp4", "stages=[smoothquant,rtn]", "eval.backends=none"])
    df = run(cfg, tmp_path / "run")
    cov, bits = _sim(df, "coverage"), _sim(df, "avg_bits")
    assert bits["smoothquant"] == 16 and cov["smoothquant"] == 0 and cov["dense"] == 0
    assert cov["rtn"] == 1 and cov["smoothquant > rtn"] == 1


def test_other_weights_without_a_name_are_named_by_their_path(tiny_overrides, tiny_llama, tmp_path):
    """model.path without model.name once labelled every row and the title `charllama`, the default's name."""
    over = [o for o in tiny_overrides if not o.startswith("model.name")] + ["eval.backends=none"]
    df = run(compose_config(over), tmp_path / "run")
    assert set(df["model"]) == {str(tiny_llama)}
    assert (tmp_path / "run" / "summary.md").read_text().startswith(f"# {tiny_llama} on tiny")


def _name(*overrides: str) -> str:
    from helpers import settings

    return settings(compose_config(list(overrides))).model.name


def test_two_models_never_share_a_name(tiny_llama, tmp_path):
    import shutil

    twin = tmp_path / "elsewhere" / tiny_llama.name  # the same folder name in another place
    shutil.copytree(tiny_llama, twin)
    assert _name(f"model.path={tiny_llama}") != _name(f"model.path={twin}") == str(twin)
    assert _name() == "charllama" and _name("model=charmixtral") == "charmixtral"  # their own weights: their names
    from compress_order.core.paths import ASSETS_DIR

    assert _name(f"model.path={ASSETS_DIR / 'charllama'}") == "charllama"  # the default path, spelled out
    assert _name(f"model.path={tiny_llama}", "model.name=mine") == "mine"  # a name given is kept
    assert _name("model=llama", "model.path=org/other-7b") == "org/other-7b"  # a hub id as given
    assert _name("model=llama", "+model.revision=abc") == "llama-2-7b@abc"
    assert _name("model=resnet18", "data=mnist", f"model.checkpoint={twin}/model.safetensors") == str(
        twin / "model.safetensors"
    )
    assert _name("model=resnet18", "data=mnist", "model.arch=resnet34") == "resnet34"
    assert _name("model=timm", "data=mnist", "model.arch=convnext_atto") == "convnext_atto"
    assert _name("model=mnist_resnet", "data=mnist") == "mnist-resnet"
