"""The two real pretrained checkpoints in the coverage table: SmolLM2-135M and Gemma 3 270M, each run through both
orders of [wanda, gptq] on a little Wikipedia text, every projection outside the (tied) head compressed.

Slow and skipped without the files (`python scripts/get_smollm2.py`, `get_gemma3.py`, `get_wikipedia.py`); their
order verdicts are the study's (docs/real-models.md), not this test's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from compress_order.config.compose import compose_config
from matrix_report import kinds, record

REAL = {"smollm2": "SmolLM2-135M (pretrained)", "gemma3_270m": "Gemma 3 270M (pretrained)"}


def _present(model: str) -> bool:
    cfg = compose_config([f"model={model}", "data=wikipedia"])
    gguf = Path(cfg.model.path) / (cfg.model.gguf_file or "")
    return gguf.is_file() and Path(cfg.data.valid).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model", [pytest.param(m, marks=pytest.mark.skipif(not _present(m), reason=f"no {m} files"))
                                   for m in REAL])  # fmt: skip
def test_real_checkpoint_runs_both_orders_and_compresses_every_projection(model, tmp_path, caplog):
    from helpers import run

    over = [f"model={model}", "data=wikipedia", "stages=[wanda,gptq]", "bits=4", "group_size=32", "sparsity=0.5",
            "eval.seqlen=128", "eval.max_windows=2", "eval.batch_size=1", "calibration.nsamples=2",
            "calibration.seqlen=128", "eval.backends=none", "eval.latency.repeats=1", "eval.latency.warmup=0",
            "eval.latency.decode_tokens=0", "threads=2", f"store_dir={tmp_path / 'store'}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="compress_order"):
        df = run(compose_config(over), tmp_path / "out")
    ok = df[(df.status == "ok") & (df.backend == "dense-simulated")]
    v = ok.pivot_table(index="order", columns="metric", values="value")
    full = ["wanda > gptq", "gptq > wanda"]
    assert all(math.isfinite(v.loc[o, "perplexity"]) and v.loc[o, "perplexity"] > v.loc["dense", "perplexity"]
               for o in full)  # fmt: skip
    assert all(v.loc[o, "coverage"] == 1 and v.loc[o, "sparsity"] >= 0.5 - 1e-6 for o in full)
    blocks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoder blocks")]
    from transformers import AutoModelForCausalLM

    cfg = compose_config(over)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, gguf_file=cfg.model.gguf_file, dtype=torch.float32)
    linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    record("decoder", REAL[model], f"`{cfg.model.name}` from its GGUF (dequantized; not full precision)",
           kinds(linears), ["lm_head"], blocks[0].removeprefix("decoder blocks: ") if blocks else "", full)
