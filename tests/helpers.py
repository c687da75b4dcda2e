"""Helpers the test modules share (fixtures live in conftest.py); no test module imports another."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
)


def settings(cfg):
    """A composed config through the edge the `run` job uses: the typed, checked RunSettings."""
    from compress_order.config.settings import run_settings

    return run_settings(cfg)


def run(cfg, out_dir: Path, store=None):
    """`compress-order run` in-process: the composed config through the edge, then the runner."""
    from compress_order.run.runner import run as run_settings_

    return run_settings_(settings(cfg), out_dir, store)


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


def write_fake_run(run_dir: Path, results: list[dict], samples: list, finished: bool = True) -> None:
    """A run folder as the runner leaves it: tidy rows, per-unit samples and (when finished) a summary."""
    import pandas as pd

    from compress_order.core.schema import COLUMNS

    run_dir.mkdir(parents=True)
    pd.DataFrame(results, columns=COLUMNS).to_parquet(run_dir / "results.parquet")
    pd.concat(samples).to_parquet(run_dir / "samples.parquet")
    if finished:
        (run_dir / "summary.md").write_text("# done\n")


def tiny_llama_model(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def token_batches(n: int = 4, seqlen: int = 32, vocab: int = 40, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


# Tiny decoder checkpoints of each family (test_families.py runs them end to end).
HIDDEN, LAYERS, HEADS, FFN, CONTEXT = 64, 2, 4, 128, 64
# The families the calibration driver is tested on; docs/how-it-works.md (linked from README.md) lists exactly these.
FAMILIES = ("LLaMA", "Mistral", "Qwen2", "OPT", "GPT-2", "GPT-NeoX", "Phi-3", "Gemma2", "Falcon")


def family_config(family: str, vocab: int):
    """A transformers config of `family` with hidden 64, 2 layers and the char tokenizer's vocabulary."""
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    gqa = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=2, max_position_embeddings=CONTEXT, **ids)  # fmt: skip
    builders: dict[str, Callable[[], object]] = {
        "LLaMA": lambda: tf.LlamaConfig(**gqa),
        "Mistral": lambda: tf.MistralConfig(sliding_window=32, **gqa),
        "Qwen2": lambda: tf.Qwen2Config(**gqa),
        "OPT": lambda: tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, word_embed_proj_dim=HIDDEN,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    max_position_embeddings=CONTEXT, **ids),
        "GPT-2": lambda: tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, **ids),
        "GPT-NeoX": lambda: tf.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, max_position_embeddings=CONTEXT, **ids),
        "Phi-3": lambda: tf.Phi3Config(**gqa),
        "Gemma2": lambda: tf.Gemma2Config(head_dim=HIDDEN // HEADS, sliding_window=32, **gqa),
        "Falcon": lambda: tf.FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          **ids),
    }  # fmt: skip
    return builders[family]()


class FakeClock:
    """Wall-clock seconds that pass only when `sleep` is called: code timed by it behaves the same under any load."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def exit_code(argv: list[str]) -> int:
    """Exit code of the CLI: errors found inside the Hydra job exit through SystemExit."""
    from compress_order.cli.main import main

    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def readme_list(marker: str, page: str = "docs/how-it-works.md") -> tuple[str, ...]:
    """The names the documentation `page` (README.md's "What a run does" in full) lists after `marker`, up to the
    next colon ("A, B and C:")."""
    text = " ".join((Path(__file__).resolve().parents[1] / page).read_text().split())
    assert marker in text, marker
    listed = text.split(marker, 1)[1].split(":", 1)[0]
    return tuple(n for n in (n.strip(" .,") for n in listed.replace(" and ", ", ").split(",")) if n)


# Mixture-of-experts families (transformers 5 fused experts): hidden 64, 2 layers, 4 experts (DeepSeek-V3: 8 in 2
# router groups, so that pruning half leaves each group the two its score needs), top-2.
MOE_FAMILIES = ("Mixtral", "Qwen2-MoE", "Qwen3-MoE", "OLMoE", "DeepSeek-V3", "GPT-OSS")


def moe_config(family: str, vocab: int, experts: int | None = None, top_k: int = 2):
    import transformers as tf

    experts = experts or (8 if family == "DeepSeek-V3" else 4)
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


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# A CLI run that stops inside the evaluation of its `HOLD_AT`-th node, having written `HOLD_FILE`: a test that
# interrupts or kills it there knows how many nodes finished, however fast or loaded the machine is. SIGINT is
# handled as in a terminal: a suite started in the background (`make test &`) passes SIGINT on ignored, and Python
# then installs no KeyboardInterrupt handler.
HELD_RUN = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # ctrl-c as in a terminal, even under a shell that ignores it
from compress_order.evaluation.tasks.lm import LMTask
real, seen = LMTask.evaluate, [0]
def held(self, model):
    seen[0] += 1
    if seen[0] == int(os.environ["HOLD_AT"]):
        open(os.environ["HOLD_FILE"], "w").close()
        while True:
            time.sleep(0.01)
    return real(self, model)
LMTask.evaluate = held
from compress_order.cli.main import main
sys.exit(main())
"""


def held_run(args: list[str], at: int, ready: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `compress-order <args>` held in its `at`-th evaluation (see HELD_RUN)."""
    import os
    import sys

    return [sys.executable, "-c", HELD_RUN, *args], {**os.environ, "HOLD_AT": str(at), "HOLD_FILE": str(ready)}


def wait_for(path: Path, proc, limit_s: float = 300) -> None:
    """Until `path` exists (the held run reached its node) or the process ended; the limit only stops a hang."""
    deadline = time.monotonic() + limit_s
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), "the run ended before reaching the node it was to be held in"
