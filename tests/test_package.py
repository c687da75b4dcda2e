"""The built wheel is a working tool on its own: configs and assets ship inside it, no checkout needed."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The test environment without anything that could put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A clean copy of the source: setuptools reuses a stale build/ folder of the checkout.
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "outputs", "multirun", "*.egg-info", "__pycache__", ".pytest_cache"))  # fmt: skip
    # No build isolation: the dev extra provides setuptools, so building needs no network.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    (whl,) = out.glob("compress_order-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; the test venv's site-packages lends it torch & co. without its
    .pth files, so the editable install of the checkout is not visible there."""
    d = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True)
    (purelib,) = (d / "lib").glob("python*/site-packages")
    (purelib / "_test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(d / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)],
        check=True, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    return d


def test_wheel_ships_configs_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in [p.relative_to(ROOT).as_posix() for p in (ROOT / "compress_order" / "conf").rglob("*.yaml")]:
        assert rel in names, f"{rel} is not in the wheel"
    for rel in [p.relative_to(ROOT).as_posix() for p in (ROOT / "compress_order" / "assets").rglob("*") if p.is_file()]:
        assert rel in names, f"{rel} is not in the wheel"
    assert not any(n.startswith(("conf/", "hydra_plugins/", "tests/")) for n in names)


def test_installed_wheel_lists_and_runs_outside_the_checkout(venv, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)

    where = call(str(venv / "bin" / "python"), "-c", "import compress_order; print(compress_order.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve())

    listed = call(str(venv / "bin" / "compress-order"), "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("charllama", "mnist_resnet", "shakespeare", "magnitude", "gptq", "mini_lm", "local_parallel"):
        assert name in listed.stdout

    ran = call(
        str(venv / "bin" / "compress-order"), "run", "eval.max_windows=2", "eval.backends=none",
        "eval.latency.repeats=1", "eval.latency.warmup=0", "eval.latency.decode_tokens=0", "threads=1",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    (results,) = (cwd / "outputs" / "runs").glob("*/*/results.parquet")
    df = pd.read_parquet(results)
    assert set(df["order"]) == {"dense", "magnitude", "rtn", "magnitude > rtn", "rtn > magnitude"}
    assert (df["status"] == "ok").all() and df["model"].eq("charllama").all()
    assert (cwd / "outputs" / "store").is_dir()
