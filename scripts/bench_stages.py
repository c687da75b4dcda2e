#!/usr/bin/env python
"""Time and peak memory of each compression stage, printed as a markdown table.

Models: the embedded char-level LLaMA (compress_order/assets/charllama, skipped with a note when absent) and a
randomly initialised LLaMA-shaped model of ~110M parameters (hidden 768, 12 layers, MLP 2048, vocab 32000,
tied embeddings). Each stage starts from the dense weights; stages come from compress_order/conf/stage/*.yaml with the targets
given here. Peak memory is the growth over the stage's start: CUDA max_memory_allocated on a GPU, else the
process's peak RSS (VmHWM, reset before each stage through /proc/self/clear_refs, after malloc_trim). `cpu_s` is
the process's CPU time over the stage (all threads): on a shared machine, with --threads 1, steadier than wall time.

    python scripts/bench_stages.py --nsamples 16 --seqlen 256 --device cpu
    python scripts/bench_stages.py --device cpu --threads 1 --stages gptq sparsegpt --src ../main  # main's code

Before/after of the solver work (#40): docs/development.md, "Kernel speed".
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _source_root() -> Path:
    """`--src DIR`: the checkout whose compress_order is timed (default: this one), read before the imports below
    so one script times two versions, e.g. `git worktree add ../main-copy main` against this branch."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--src" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if a.startswith("--src="):
            return Path(a.split("=", 1)[1]).resolve()
    return ROOT


sys.path.insert(0, str(_source_root()))

from compress_order.stages.calibration import calibrate_and_compress  # noqa: E402
from compress_order.config.compose import compose_config  # noqa: E402
from compress_order.evaluation.measure import compression_metrics  # noqa: E402
from compress_order.core.paths import ASSETS_DIR  # noqa: E402
from compress_order.config.stages import build_stage, stage_configs  # noqa: E402
from compress_order.stages.base import Stage  # noqa: E402
from compress_order.modeling.targets import ModelState, find_targets  # noqa: E402
from compress_order.core.devices import resolve_device  # noqa: E402
from compress_order.core.settings import Calibration  # noqa: E402

STAGES = ["magnitude", "rtn", "wanda", "sparsegpt", "gptq", "sparsegpt_gptq"]


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak bytes allocated above the level at entry, on `device`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            try:  # hand freed heap back to the OS, so the RSS peak shows this stage's own growth
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                self.start = _rss_kb("VmRSS") * 1024
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.peak = _rss_kb("VmHWM") * 1024 - self.start


def random_llama(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval().to(device)


def charllama(device: torch.device):
    from compress_order.loaders.models import causal_lm

    lm = causal_lm("charllama", str(ASSETS_DIR / "charllama"), dtype="float32")
    return lm.model.to(device), lm.tokenizer


def text_batches(tokenizer, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    try:
        from compress_order.loaders.models import token_ids
    except ImportError:  # --src: a checkout from before the loader tokenized the run's text
        from compress_order.evaluation.tasks.lm import encode as token_ids

    ids = token_ids(tokenizer, (ASSETS_DIR / "shakespeare" / "train.txt").read_text())
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g).tolist()
    return [ids[s : s + seqlen].unsqueeze(0) for s in starts]


def random_batches(vocab: int, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(nsamples)]


def build_stages(names: list[str], args: argparse.Namespace) -> list[Stage]:
    cfg = compose_config([f"sparsity={args.sparsity}", f"bits={args.bits}", f"group_size={args.group_size}"])
    cfg.stages = names
    return [build_stage(sc) for sc in stage_configs(cfg)]


def bench(model_name: str, model, batches, stages: list[Stage], device: torch.device, calib: Calibration) -> list[dict]:
    targets = find_targets(model, ["lm_head"])
    state = ModelState(model, targets)
    dense = state.snapshot()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for stage in stages:
        state.restore(dense)
        stage.validate(targets)
        with PeakMemory(device) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            if stage.needs is None:
                for t in targets.values():
                    stage.compress(t, None)
            else:
                calibrate_and_compress(model, targets, batches, stage, calib, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        state.check()
        m = compression_metrics(model, targets)
        rows.append({
            "model": model_name, "params": f"{params / 1e6:.1f}M", "stage": stage.label,
            "time_s": f"{seconds:.2f}", "cpu_s": f"{cpu:.2f}", "peak_mem_MB": f"{mem.peak / 2**20:.0f}",
            "sparsity": f"{m['sparsity']:.3f}", "avg_bits": f"{m['avg_bits']:.2f}",
        })  # fmt: skip
        print(f"  {model_name} {stage.label}: {seconds:.2f}s ({cpu:.2f}s CPU)", file=sys.stderr, flush=True)
    state.restore(dense)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=16, help="calibration segments (default 16)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per segment (default 256)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument(
        "--stages", nargs="+", default=STAGES, help=f"compress_order/conf/stage names (default: {' '.join(STAGES)})"
    )
    ap.add_argument("--models", nargs="+", default=["charllama", "random100m"], choices=["charllama", "random100m"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--true-sequential", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--src", default=str(ROOT), help="checkout whose compress_order is timed (default: this one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    stages = build_stages(args.stages, args)
    calib = Calibration(true_sequential=args.true_sequential)
    rows: list[dict] = []
    notes = []
    with torch.no_grad():
        for name in args.models:
            if name == "charllama":
                if not (ASSETS_DIR / "charllama").is_dir():
                    notes.append("charllama skipped: compress_order/assets/charllama is absent (train_charllama.py)")
                    continue
                model, tok = charllama(device)
                batches = text_batches(tok, args.nsamples, args.seqlen, args.seed)
            else:
                model = random_llama(device)
                batches = random_batches(model.config.vocab_size, args.nsamples, args.seqlen, args.seed)
            rows += bench(name, model, batches, stages, device, calib)
            del model
    print(
        f"device={device} nsamples={args.nsamples} seqlen={args.seqlen} sparsity={args.sparsity} bits={args.bits} "
        f"group_size={args.group_size} true_sequential={args.true_sequential} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} src={ASSETS_DIR.parents[1]}\n"
    )
    if rows:
        print(markdown(rows))
    for n in notes:
        print(f"\nnote: {n}")


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    main()
