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

torch.set_num_threads(1)

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
)


def char_tokenizer(text: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def save_tiny_llama(path: Path, text: str = TEXT, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer(text)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def terminal_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows for `text`: a progress bar redrawn with \\r leaves only its last state."""
    return [shown for ln in text.split("\n") if (shown := ln.rsplit("\r", 1)[-1]).strip()]


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


def write_fake_run(run_dir: Path, results: list[dict], samples: list, finished: bool = True) -> None:
    """A run folder as the runner leaves it: tidy rows, per-unit samples and (when finished) a summary."""
    import pandas as pd

    from compress_order.results import COLUMNS

    run_dir.mkdir(parents=True)
    pd.DataFrame(results, columns=COLUMNS).to_parquet(run_dir / "results.parquet")
    pd.concat(samples).to_parquet(run_dir / "samples.parquet")
    if finished:
        (run_dir / "summary.md").write_text("# done\n")


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
