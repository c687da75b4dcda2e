"""Per-node peak memory: a high-water mark reset where a node's work starts, recorded as `peak_mem_mb`."""

from __future__ import annotations

import os

import torch

from compress_order.config import compose_config
from compress_order.measure import peak_memory_mb, reset_peak
from compress_order.metrics import METRICS
from compress_order.runner import run


def test_cpu_peak_sees_a_transient_allocation_after_a_reset():
    cpu = torch.device("cpu")
    reset_peak(cpu)
    before = peak_memory_mb(cpu)
    x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched, then freed: only the peak remembers it
    del x
    assert peak_memory_mb(cpu) >= before + 60
    if os.access("/proc/self/clear_refs", os.W_OK):  # Linux: a reset forgets it
        reset_peak(cpu)
        assert peak_memory_mb(cpu) < before + 60


def test_every_node_records_its_peak_memory(tiny_overrides, tmp_path):
    df = run(compose_config(tiny_overrides + ["eval.backends=none", "device=cpu"]), tmp_path / "out")
    peak = df[df["metric"] == "peak_mem_mb"].set_index("order")["value"]
    assert set(peak.index) == set(df["order"]) and (peak > 0).all()
    assert METRICS["peak_mem_mb"].measured and not METRICS["peak_mem_mb"].higher_is_better
    assert "peak_mem_mb" in (tmp_path / "out" / "summary.md").read_text()
