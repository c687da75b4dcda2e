#!/usr/bin/env python
"""Where a trie node's wall time goes: the stage's algorithm, calibration, the evaluation forward, and the rest.

A random LLaMA of the size given (saved with a char tokenizer of the embedded Shakespeare, loaded as a run loads
it) goes through the real runner (`compress-order run` in-process, a fresh node store, eval.backends=none unless
--backends) on a small trie: by default magnitude, rtn (data-free) and wanda (calibrated), 16 nodes.

Known functions are wrapped with timers that count *exclusive* time (a timed call inside another is taken out of
the outer one): the stage's compress / compress_group / compress_model (algorithm), calibrate_and_compress and
static activation observation (calibration: block forwards and statistics), the task's evaluate (eval forward),
ModelState.snapshot / restore, the invariant checks, compression_metrics, the latency timings; the rest of a
segment is "untimed" (node store, rows, feasibility, glue). The walk's wall time is cut into segments: a node's
application runs from the end of the previous segment to the end of its stage (so the parent's snapshot and the
sibling's restore count there), its evaluation is its visit. Rows are per kind of the node's last stage (the
dense node is evaluated only, and times the dense latency once for the run). On CUDA every timer synchronises,
so kernels are charged to the function that queued them.

    python scripts/bench_overhead.py --threads 1                       # ~30M parameters, float32, ~1-2 min on CPU
    python scripts/bench_overhead.py --hidden 1024 --layers 8 --intermediate 2816 --vocab 32000 --dtype bfloat16 \
        --stages magnitude rtn                                         # issue 40's reference: 168M parameters
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress_order.core.paths import ASSETS_DIR  # noqa: E402

# Exclusive-time categories; the last four are "everything else".
ALGORITHM, CALIBRATION, FORWARD = "algorithm", "calibration", "eval forward"
SNAPSHOT, CHECKS, ACCOUNTING, LATENCY = "snapshot/restore", "invariant checks", "compression metrics", "latency"
UNTIMED = "untimed (store, rows, glue)"
OTHER = (SNAPSHOT, CHECKS, ACCOUNTING, LATENCY, UNTIMED)
KINDS = ("data-free stage node", "calibrated stage node", "dense node")
PARTS = ("application", "evaluation")


class Clock:
    """Exclusive time per category: a timer nested in another takes its time out of the outer one."""

    def __init__(self, device: torch.device) -> None:
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.stack: list[list[float]] = []  # per open timer: time spent in timers nested in it
        self.bucket: dict[str, float] = defaultdict(float)

    def wrap(self, fn: Callable, category: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t0 = time.perf_counter()
            self.stack.append([0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                inner = self.stack.pop()[0]
                self.bucket[category] += dt - inner
                if self.stack:
                    self.stack[-1][0] += dt

        return timed

    def patch(self, owner: Any, name: str, category: str) -> None:
        setattr(owner, name, self.wrap(getattr(owner, name), category))


class Segments:
    """The walk's wall time cut into segments, each a node's application or evaluation, with the categories' time
    spent inside it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.last: float | None = None
        self.wall: dict[tuple[str, str], float] = defaultdict(float)
        self.nodes: dict[tuple[str, str], int] = defaultdict(int)
        self.spent: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def start(self) -> None:
        self.clock.sync()
        self.last = time.perf_counter()
        self.clock.bucket.clear()

    def close(self, kind: str, part: str) -> None:
        self.clock.sync()
        now = time.perf_counter()
        assert self.last is not None
        self.wall[kind, part] += now - self.last
        self.nodes[kind, part] += 1
        for cat, s in self.clock.bucket.items():
            self.spent[kind, part][cat] += s
        self.clock.bucket.clear()
        self.last = now


def instrument(device: torch.device) -> Segments:
    """Wrap the runner's and pipeline's known functions with timers, and its walk with segment boundaries."""
    from compress_order.evaluation.tasks.lm import LMTask
    from compress_order.modeling import act, targets
    from compress_order.run import pipeline, runner
    from compress_order.stages import calibration

    clock = Clock(device)
    seg = Segments(clock)
    clock.patch(calibration, "calibrate_and_compress", CALIBRATION)  # pipeline imports it at call time
    clock.patch(act.ActQuant, "observe", CALIBRATION)  # static activation ranges: forwards too
    clock.patch(LMTask, "evaluate", FORWARD)
    clock.patch(LMTask, "latency", LATENCY)
    clock.patch(pipeline, "latency_entries", LATENCY)
    clock.patch(pipeline, "compression_metrics", ACCOUNTING)
    clock.patch(targets.ModelState, "snapshot", SNAPSHOT)
    clock.patch(targets.ModelState, "restore", SNAPSHOT)
    clock.patch(targets.ModelState, "check", CHECKS)
    clock.patch(targets, "check_invariants", CHECKS)  # per layer (Target.check)
    for name in ("check_layers", "check_invariants"):  # what the pipeline calls, in this version or an older one
        if hasattr(pipeline, name):
            clock.patch(pipeline, name, CHECKS)

    build_stages = pipeline.RunContext.build_stages

    def timed_stages(self: Any, specs: dict) -> dict:
        stages = build_stages(self, specs)
        for stage in stages.values():
            for name in ("compress", "compress_group", "compress_model", "compress_experts"):
                clock.patch(stage, name, ALGORITHM)  # the instance's bound method: nested calls count once
        return stages

    pipeline.RunContext.build_stages = timed_stages  # type: ignore[method-assign]

    walk_run, walk_apply, walk_visit = runner.TrieWalk.run, runner.TrieWalk.apply, runner.TrieWalk.visit

    def run(self: Any, desc: str) -> None:
        seg.start()
        walk_run(self, desc)

    def kind(self: Any, node: Any) -> str:
        if not node.order:
            return "dense node"
        return "calibrated stage node" if self.stages[node.stage].needs is not None else "data-free stage node"

    def apply(self: Any, node: Any) -> None:
        walk_apply(self, node)
        seg.close(kind(self, node), "application")

    def visit(self: Any, node: Any) -> None:
        walk_visit(self, node)
        seg.close(kind(self, node), "evaluation")

    runner.TrieWalk.run, runner.TrieWalk.apply, runner.TrieWalk.visit = run, apply, visit  # type: ignore[method-assign]
    return seg


def save_random_llama(path: Path, args: argparse.Namespace) -> int:
    """A random LLaMA of the requested shape, saved as a checkpoint with a char tokenizer; its parameter count."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = "".join((ASSETS_DIR / "shakespeare" / f).read_text() for f in ("train.txt", "valid.txt"))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(
        vocab_size=max(args.vocab, len(vocab)), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(2048, args.seqlen), tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def pct(x: float, total: float) -> str:
    return f"{100 * x / total:.1f}%" if total > 0 else "-"


def tables(seg: Segments) -> str:
    """Shares of each node kind's wall time (per part, and the whole node), and the parts of everything else."""
    cols = (ALGORITHM, CALIBRATION, FORWARD)
    out = ["| node kind | part | nodes | wall s/node | algorithm | calibration | eval forward | everything else |"]
    out.append("|---|---|---|---|---|---|---|---|")
    rest = ["| node kind | part | " + " | ".join(OTHER) + " |", "|---|---|" + "---|" * len(OTHER)]
    for kind in KINDS:
        keys = [(kind, p) for p in PARTS if seg.nodes.get((kind, p))]
        if not keys:
            continue
        rows = [(p, [(kind, p)]) for _, p in keys] + ([("whole node", keys)] if len(keys) > 1 else [])
        for part, ks in rows:
            n = max(seg.nodes[k] for k in ks)
            wall = sum(seg.wall[k] for k in ks)
            spent: dict[str, float] = defaultdict(float)
            for k in ks:
                for cat, x in seg.spent[k].items():
                    spent[cat] += x
            spent[UNTIMED] = wall - sum(spent.values())
            other = sum(spent[c] for c in OTHER)
            shares = " | ".join(pct(x, wall) for x in [spent[c] for c in cols] + [other])
            bold = "**" if part == "whole node" else ""
            out.append(f"| {kind} | {bold}{part}{bold} | {n} | {wall / n:.2f} | {shares} |")
            rest.append(f"| {kind} | {part} | " + " | ".join(pct(spent[c], wall) for c in OTHER) + " |")
    return "\n".join(out) + "\n\neverything else, by part (share of the same wall time):\n\n" + "\n".join(rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=16000, help="embedding rows (the char tokenizer uses the first ~70)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--stages", nargs="+", default=["magnitude", "rtn", "wanda"], help="compress_order/conf/stage names"
    )
    ap.add_argument("--windows", type=int, default=2, help="evaluation windows (eval.max_windows)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per window and calibration segment")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration segments")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format", default="int", help="int | fp8 | nvfp4 | mxfp4")
    ap.add_argument("--backends", default="none", help="eval.backends (packed latency): none | auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 gives steadier shares on a busy host)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cprofile", type=int, default=0, help="also print the N functions of most own time (cProfile)")
    args = ap.parse_args()

    from compress_order.config.compose import compose_config
    from compress_order.config.settings import run_settings
    from compress_order.core.devices import resolve_device
    from compress_order.run.runner import run

    device = resolve_device(args.device)
    seg = instrument(device)
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        tmp_path = Path(tmp)
        params = save_random_llama(tmp_path / "model", args)
        overrides = [
            "model=llama", f"model.path={tmp_path / 'model'}", "model.name=random", f"model.dtype={args.dtype}",
            f"model.seqlen={args.seqlen}", "data=shakespeare", f"eval.max_windows={args.windows}",
            f"eval.backends={args.backends}", f"calibration.nsamples={args.nsamples}",
            f"stages=[{','.join(args.stages)}]", f"sparsity={args.sparsity}", f"format={args.format}",
            f"device={args.device}", f"threads={args.threads}", f"seed={args.seed}",
            f"store_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}",
        ]  # fmt: skip
        if args.format == "int":
            overrides += [f"bits={args.bits}", f"group_size={args.group_size}"]
        settings = run_settings(compose_config(overrides))
        t0 = time.perf_counter()
        if args.cprofile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(run, settings, tmp_path / "out")
        else:
            run(settings, tmp_path / "out")
        total = time.perf_counter() - t0
    print(
        f"random LLaMA {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, MLP "
        f"{args.intermediate}, vocab {args.vocab}, {args.dtype}); stages={args.stages} format={args.format}; "
        f"{args.windows} windows of {args.seqlen} tokens; {args.nsamples} calibration segments; device={device} "
        f"threads={args.threads} torch={torch.__version__}; run {total:.1f}s, trie walk "
        f"{sum(seg.wall.values()):.1f}s\n"
    )
    print(tables(seg))
    if args.cprofile:
        print()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    main()
