"""Streaming evaluation (`eval.offload`): the model stays on its home device and one block at a time computes on
the evaluation device. On CPU the streaming path is forced with eval.offload=cpu and must give the in-memory
path's numbers; the block moves are observed directly."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from compress_order.config.compose import compose_config
from compress_order.core.errors import UserError
from compress_order.core.instantiate import build
from compress_order.evaluation.metrics import METRICS
from compress_order.modeling.offload import streamed
from helpers import run, settings
from compress_order.evaluation.tasks import build_task

EMBEDDED = ["eval.max_windows=2", "eval.batch_size=1", "calibration.nsamples=2", "calibration.seqlen=32",
            "device=cpu", "threads=1", "eval.backends=none", "eval.latency.repeats=1", "eval.latency.warmup=0",
            "eval.latency.decode_tokens=2"]  # fmt: skip


def test_streamed_forward_moves_one_block_at_a_time_and_restores_placement():
    cfg = compose_config(EMBEDDED)
    model = build(cfg.model).model
    blocks = model.model.layers
    moves: list[tuple[int, str]] = []
    for i, b in enumerate(blocks):
        real = b.to

        def spy(*args, i=i, real=real, **kw):
            moves.append((i, str(args[0] if args else kw.get("device"))))
            return real(*args, **kw)

        b.to = spy  # type: ignore[method-assign]
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with streamed(model, "model.layers", torch.device("cpu")):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    per_block = [(i, "cpu") for i in range(len(blocks)) for _ in range(2)]  # arrive, then leave, block by block
    assert moves == per_block
    assert all(h == {} for b in blocks for h in (b._forward_pre_hooks, b._forward_hooks))  # hooks removed


def test_offloaded_run_equals_the_in_memory_run():
    """Every node's perplexity (and the other weight-determined metrics) through the streaming path equals the
    in-memory path's, over both orders of a calibrated pair."""
    import tempfile
    from pathlib import Path

    def values(df: pd.DataFrame) -> pd.Series:
        keep = df[(df["backend"] == "dense-simulated") & ~df["metric"].map(lambda m: METRICS[m].measured)]
        return keep.set_index(["order", "metric"])["value"].sort_index()

    with tempfile.TemporaryDirectory() as d:
        base = EMBEDDED + ["stages=[magnitude,rtn]", "bits=4", "sparsity=0.5", "group_size=64", "store_dir=null"]
        mem = run(compose_config(base), Path(d) / "mem")
        off = run(compose_config(base + ["eval.offload=cpu"]), Path(d) / "off")
    pd.testing.assert_series_equal(values(off), values(mem), rtol=1e-6)
    assert off["metric"].eq("decode_ms_per_token").any()  # generation with a KV cache streams too


def test_offload_needs_a_block_list_and_a_device():
    with pytest.raises(UserError, match="eval.offload=warp is unknown"):
        settings(compose_config(["eval.offload=warp"]))
    cfg = compose_config(["model=mnist_resnet", "data=mnist", "eval.offload=cpu", "device=cpu"])
    with pytest.raises(UserError, match="eval.offload"):
        build_task(build(cfg.model), build(cfg.data), settings(cfg))
