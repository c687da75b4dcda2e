"""Shared fixtures: offline Hugging Face settings and a tiny LLaMA saved like a real checkpoint."""

from __future__ import annotations

import os
import tempfile

# Offline and isolated before anything imports huggingface_hub / datasets.
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TEXT, save_tiny_llama  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny_text")
    (d / "train.txt").write_text(TEXT * 20)
    (d / "valid.txt").write_text(TEXT * 4)
    return {"train": d / "train.txt", "valid": d / "valid.txt"}


@pytest.fixture
def tiny_overrides(tiny_llama, tiny_text, tmp_path) -> list[str]:
    """Overrides that point a run at the tiny model and text, with outputs under tmp_path."""
    return [
        f"model.path={tiny_llama}", "model.name=tiny", "model.seqlen=64",
        f"data.train={tiny_text['train']}", f"data.valid={tiny_text['valid']}", "data.name=tiny",
        "calibration.nsamples=4", "eval.latency.repeats=2", "eval.latency.warmup=1",
        f"store_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "threads=1",
    ]  # fmt: skip
