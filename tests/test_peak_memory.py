"""Per-node peak memory: a high-water mark reset where a node's work starts, recorded as `peak_mem_mb`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import run

from compress_order.config.compose import compose_config
from compress_order.evaluation.metrics import METRICS

PROBE = """
import os, torch
from compress_order.evaluation.measure import peak_memory_mb, reset_peak
cpu = torch.device("cpu")
reset_peak(cpu)
before = peak_memory_mb(cpu)
x = torch.ones(256 * 2**20 // 4)  # 256 MB, touched, then freed: only the peak remembers it
del x
after = peak_memory_mb(cpu)
reset_peak(cpu)
print(before, after, peak_memory_mb(cpu), os.access("/proc/self/clear_refs", os.W_OK))
"""


def test_cpu_peak_sees_a_transient_allocation_after_a_reset():
    # A fresh process: in a long test session freed memory is reused without raising the resident set.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    before, after, reset = map(float, out[:3])
    assert after >= before + 240
    if out[3] == "True":  # Linux: a reset forgets it
        assert reset < before + 240


def test_every_node_records_its_peak_memory(tiny_overrides, tmp_path):
    df = run(compose_config(tiny_overrides + ["eval.backends=none", "device=cpu"]), tmp_path / "out")
    peak = df[df["metric"] == "peak_mem_mb"].set_index("order")["value"]
    assert set(peak.index) == set(df["order"]) and (peak > 0).all()
    assert METRICS["peak_mem_mb"].measured and not METRICS["peak_mem_mb"].higher_is_better
    assert "peak_mem_mb" in (tmp_path / "out" / "summary.md").read_text()


TRIM_PROBE = """
import gc, sys
from transformers import AutoTokenizer
from compress_order.core.memory import trim_heap
from compress_order.core.paths import ASSETS_DIR

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

tok = AutoTokenizer.from_pretrained(ASSETS_DIR / "charllama")
text = (ASSETS_DIR / "shakespeare" / "train.txt").read_text()[:400_000]
tok("warm up", add_special_tokens=False)
gc.collect()
base = rss_mb()
ids = tok(text, add_special_tokens=False)["input_ids"]
assert len(ids) == len(text)
del ids
gc.collect()
kept = rss_mb()
trimmed = trim_heap()
print(base, kept, rss_mb(), trimmed)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc/self/status")
def test_trim_heap_gives_back_what_tokenizing_left_resident():
    """The runner trims the heap once a task has tokenized its text: what the tokenizer freed stayed resident."""
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True).stdout.split()
    base, kept, after = map(float, out[:3])
    assert kept - base > 20, "tokenizing 400k characters left less than 20 MB resident: the probe tests nothing"
    assert out[3] == "True" and after - base < 0.3 * (kept - base)


ARENA_PROBE = """
import gc, sys, torch
from transformers import AutoTokenizer
from compress_order.core.memory import apart, return_freed_blocks, trim_heap
from compress_order.core.paths import ASSETS_DIR
from compress_order.loaders.models import token_ids

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

return_freed_blocks()
tok = AutoTokenizer.from_pretrained(ASSETS_DIR / "charllama")
text = (ASSETS_DIR / "shakespeare" / "train.txt").read_text()[:400_000]
tokenize = apart if sys.argv[1] == "apart" else (lambda fn, *args: fn(*args))
ids = tokenize(token_ids, tok, text)
gc.collect()
trim_heap()
base = rss_mb()
for _ in range(3):  # a stage's per-layer temporaries: tensors of a few MB, allocated and freed
    ts = [torch.ones(2**20 * 5 // 4) for _ in range(20)]
    del ts
print(base, rss_mb(), len(ids))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas and /proc/self/status")
def test_tokenizing_apart_leaves_no_heap_holes_for_later_tensors_to_stay_resident_in():
    """The loader tokenizes on a thread of its own (core.memory.apart): on the main thread, the heap holes the
    tokenizer leaves (trimmed or not) are where later tensors land, resident after they are freed."""
    def probe(how):
        out = subprocess.run([sys.executable, "-c", ARENA_PROBE, how], capture_output=True, text=True, check=True)
        base, after, n = out.stdout.split()
        assert int(n) == 400_000  # 400k characters of the embedded Shakespeare, one token each
        return float(after) - float(base)

    inline, separate = probe("inline"), probe("apart")
    assert inline > 50, f"tokenizing inline left {inline:.0f} MB of reused holes: the probe tests nothing"
    assert separate < 20, f"{separate:.0f} MB of freed tensors stayed resident after tokenizing apart"


APART_WAIT_PROBE = """
import sys, threading
from compress_order.core.memory import apart

def blocked():
    print("started", flush=True)
    threading.Event().wait()  # never set: only an interrupt of the caller ends the wait

try:
    apart(blocked)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""


def test_apart_returns_the_value_reraises_the_error_and_ctrl_c_does_not_wait_for_the_work():
    import signal

    from compress_order.core.memory import apart

    assert apart(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ValueError, match="bad text"):
        apart(lambda: (_ for _ in ()).throw(ValueError("bad text")))
    proc = subprocess.Popen([sys.executable, "-c", APART_WAIT_PROBE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)  # a failure would block forever: the timeout only ends it
    finally:
        proc.kill()
    assert proc.returncode == 3 and out.strip() == "interrupted"
