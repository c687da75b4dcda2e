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


def readme_list(marker: str) -> tuple[str, ...]:
    """The names README.md lists after `marker`, up to the next colon ("A, B and C:")."""
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert marker in text, marker
    listed = text.split(marker, 1)[1].split(":", 1)[0]
    return tuple(n for n in (n.strip(" .,") for n in listed.replace(" and ", ", ").split(",")) if n)


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


# Mixture-of-experts families (transformers 5 fused experts): hidden 64, 2 layers, 4 experts, top-2.
MOE_FAMILIES = ("Mixtral", "Qwen2-MoE", "Qwen3-MoE", "OLMoE", "DeepSeek-V3", "GPT-OSS")


def moe_config(family: str, vocab: int, experts: int = 4, top_k: int = 2):
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, num_experts_per_tok=top_k, **ids)  # fmt: skip
    qwen = dict(intermediate_size=128, moe_intermediate_size=64, num_experts=experts, head_dim=16)
    builders = {
        "Mixtral": lambda: tf.MixtralConfig(intermediate_size=64, num_local_experts=experts, **base),
        "Qwen2-MoE": lambda: tf.Qwen2MoeConfig(shared_expert_intermediate_size=64, **qwen, **base),
        "Qwen3-MoE": lambda: tf.Qwen3MoeConfig(**qwen, **base),
        "OLMoE": lambda: tf.OlmoeConfig(intermediate_size=64, num_experts=experts, **base),
        # MLA attention, one shared expert, grouped routing; the first layer dense, the second MoE
        "DeepSeek-V3": lambda: tf.DeepseekV3Config(intermediate_size=128, moe_intermediate_size=64,
                                                   n_routed_experts=experts, n_shared_experts=1, n_group=2,
                                                   topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
                                                   kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                   v_head_dim=16, **base),
        "GPT-OSS": lambda: tf.GptOssConfig(intermediate_size=64, num_local_experts=experts, head_dim=16, **base),
    }  # fmt: skip
    return builders[family]()


def save_tiny_moe(family: str, path: Path, text: str = TEXT, seed: int = 0, **kw) -> Path:
    """A tiny random checkpoint of an MoE family, saved with save_pretrained beside a char tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer(text)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, len(tok), **kw))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
