#!/usr/bin/env python
"""Peak host memory of an order sweep beyond a plain load + forward, on random LLaMAs of a few sizes.

For each size a random LLaMA (bf16, the embedded char-LLaMA's tokenizer) is saved with save_pretrained into a
temporary folder, then two kinds of fresh subprocess load it, each reporting its own peak resident set:

  plain   the model loaded as a run loads it (loaders.models.causal_lm), one forward of one window;
  sweep   `compress-order run` over data-free stages, one evaluation window per node, no packed backends:
          2 stages [magnitude, rtn] and 3 stages [magnitude, rtn, magnitude sparsity 0.3 as m2].

The runner resets the process's high-water mark (VmHWM, via /proc/self/clear_refs) before each node, which
also resets ru_maxrss; the sweep subprocess therefore wraps `reset_peak` to read VmHWM before each reset and
reports the largest value seen (and at exit).

How to read the table: `model` is the bytes of all parameters (2 per parameter in bf16); `extra` is
(sweep peak − plain peak) / model bytes, the copies a sweep holds beyond the model itself (snapshots of the
order trie, constraint masks, temporaries); `B/param` is the slope of a least-squares line through
(parameters, sweep peak − plain peak) over the sizes: the per-parameter cost once fixed overheads (libraries,
data, the store) are taken out. `ppl` is a digest of every node's perplexity: two checkouts that compute the
same results print the same digest.

    python scripts/bench_memory.py                        # ~28M, ~50M, ~100M parameters (hidden 768)
    python scripts/bench_memory.py --hidden 1024 --layers 4,8,16 --stages 3
    PYTHONPATH=/other/checkout python scripts/bench_memory.py   # the same benchmark against another checkout
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGES = {
    2: "stages=[magnitude,rtn]",
    3: "stages=[magnitude,rtn,{name:magnitude,sparsity:0.3,label:m2}]",
}

# Read VmHWM (kB) from /proc/self/status, else ru_maxrss (kB on Linux).
_PEAK = r"""
import resource
def _peak_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

PLAIN = (
    _PEAK
    + r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from compress_order.loaders.models import causal_lm
lm = causal_lm("bench", sys.argv[1], dtype="bfloat16", seqlen=256)
ids = torch.randint(0, len(lm.tokenizer), (1, lm.seqlen))
with torch.no_grad():
    lm.model(input_ids=ids)
print(json.dumps({"peak_kb": _peak_kb()}), file=open(sys.argv[2], "w"))
"""
)

SWEEP = (
    _PEAK
    + r"""
import atexit, json, sys
peak, out = [0], sys.argv[1]  # the run rewrites sys.argv
def _report():
    peak[0] = max(peak[0], _peak_kb())
    print(json.dumps({"peak_kb": peak[0]}), file=open(out, "w"))
atexit.register(_report)
from compress_order.evaluation import measure
from compress_order.run import runner
_reset = measure.reset_peak
def reset_peak(device):
    peak[0] = max(peak[0], _peak_kb())
    _reset(device)
measure.reset_peak = runner.reset_peak = reset_peak
sys.argv = ["compress-order", "run", *sys.argv[2:]]
from compress_order.cli.main import entry
entry()
"""
)


def save_llama(path: Path, hidden: int, layers: int, intermediate: int, seed: int = 0) -> int:
    """A random bf16 LLaMA with the char-LLaMA's tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "compress_order" / "assets" / "charllama")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=256,
        tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT))
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _peak(cmd: list[str], out: Path, log: Path) -> int:
    with open(log, "w") as f:  # run in the work folder: `python -c` puts the cwd first on sys.path, and a
        # checkout there would shadow the one PYTHONPATH names
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=out.parent)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])}... failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return json.loads(out.read_text())["peak_kb"] * 1024


def plain_peak(model_dir: Path, work: Path, threads: int) -> int:
    out = work / "plain.json"
    return _peak([sys.executable, "-c", PLAIN, str(model_dir), str(out), str(threads)], out, work / "plain.log")


def sweep_peak(model_dir: Path, work: Path, n: int, threads: int) -> tuple[int, str]:
    """Peak bytes of a fresh `compress-order run` with `n` stages, and a digest of its perplexities."""
    run_dir, out = work / f"run{n}", work / f"sweep{n}.json"
    overrides = [
        f"model.path={model_dir}", "model.dtype=bfloat16", "data=shakespeare", "eval.max_windows=1",
        "eval.backends=none", "eval.latency.repeats=1", "eval.latency.warmup=0", "eval.latency.decode_tokens=0",
        f"threads={threads}", "device=cpu", f"store_dir={work / f'store{n}'}", f"hydra.run.dir={run_dir}", STAGES[n],
    ]  # fmt: skip
    peak = _peak([sys.executable, "-c", SWEEP, str(out), *overrides], out, work / f"sweep{n}.log")
    import pandas as pd

    df = pd.read_csv(run_dir / "results.csv")
    ppl = df[df["metric"] == "perplexity"].sort_values("order")
    digest = hashlib.sha256(ppl[["order", "value"]].to_csv(index=False).encode()).hexdigest()[:10]
    return peak, digest


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (nan for fewer than two distinct xs)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return float("nan") if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="768", help="hidden size(s), comma-separated (one for all sizes)")
    ap.add_argument("--layers", default="4,7,14", help="layer counts, comma-separated (one size each)")
    ap.add_argument("--intermediate", type=float, default=8 / 3, help="MLP width as a multiple of hidden")
    ap.add_argument("--stages", default="2,3", help="stage counts to sweep: 2, 3 or 2,3")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    hidden = [int(x) for x in args.hidden.split(",")]
    hidden = hidden * len(layers) if len(hidden) == 1 else hidden
    if len(hidden) != len(layers) or any(h % 64 for h in hidden):
        sys.exit("--hidden: one value, or one per --layers entry, each a multiple of 64")
    counts = [int(x) for x in args.stages.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for h, n_layers in zip(hidden, layers):
            work = Path(tmp) / f"h{h}_l{n_layers}"
            work.mkdir()
            inter = int(round(h * args.intermediate / 128)) * 128
            params = save_llama(work / "model", h, n_layers, inter)
            row = {"hidden": h, "layers": n_layers, "params": params, "model": 2 * params}
            row["plain"] = plain_peak(work / "model", work, args.threads)
            for n in counts:
                row[f"sweep{n}"], row[f"ppl{n}"] = sweep_peak(work / "model", work, n, args.threads)
            rows.append(row)
            print(f"done: {h}x{n_layers} ({params / 1e6:.1f}M params)", file=sys.stderr, flush=True)

    mb = 2**20
    head = "| params | model | plain peak | " + " | ".join(f"{n}-stage peak | extra ({n}) | ppl ({n})" for n in counts)
    print(head + " |")
    print("|" + "---|" * (3 + 3 * len(counts)))
    for r in rows:
        cells = [f"{r['params'] / 1e6:.1f}M", f"{r['model'] / mb:.0f} MB", f"{r['plain'] / mb:.0f} MB"]
        for n in counts:
            extra = (r[f"sweep{n}"] - r["plain"]) / r["model"]
            cells += [f"{r[f'sweep{n}'] / mb:.0f} MB", f"{extra:.2f} model", r[f"ppl{n}"]]
        print("| " + " | ".join(cells) + " |")
    xs = [r["params"] for r in rows]
    for n in counts:
        slope = fit_slope(xs, [r[f"sweep{n}"] - r["plain"] for r in rows])
        print(f"\n{n} stages: (sweep peak − plain peak) grows by {slope:.2f} bytes per parameter "
              f"({slope / 2:.2f} model-sizes on a bf16 model)")  # fmt: skip


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    main()
