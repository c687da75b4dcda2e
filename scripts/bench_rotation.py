#!/usr/bin/env python
"""Wall time of the whole-model stages (rotate, sleb) and what each does to the dense model, as a markdown table.

    python scripts/bench_rotation.py model=smollm2 data=wikipedia eval.max_windows=8 calibration.nsamples=8

Any run overrides are accepted (Hydra syntax). The model is loaded once; each stage is applied to the dense
weights (restored between stages, as the trie does), timed, and the node evaluated. For `rotate` the perplexity
change is the rounding of the fused rotation in the model's dtype (the function is otherwise kept).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress_order.config.compose import compose_config  # noqa: E402
from compress_order.config.settings import run_settings  # noqa: E402
from compress_order.core.errors import UserError  # noqa: E402
from compress_order.run.pipeline import RunContext  # noqa: E402

STAGES = ["rotate", "{name:rotate,heads:true}", "{name:sleb,blocks:1}", "{name:sleb,blocks:2}"]


def main(argv: list[str]) -> None:
    settings = run_settings(compose_config([*argv, f"stages=[{','.join(STAGES)}]", "eval.backends=none"]))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    ctx = RunContext.load(settings)
    load_s = time.perf_counter() - t0
    task = ctx.task(settings)
    stages = ctx.build_stages({s.label: s for s in settings.stages})
    dense = ctx.state.snapshot()
    ppl = task.evaluate(ctx.lm.model)[0]["perplexity"]
    rows = [("dense", 0.0, ppl, len(ctx.state.blocks.kept) if ctx.state.blocks else None)]
    for label, stage in stages.items():
        ctx.state.restore(dense)
        t0 = time.perf_counter()
        why = ctx.apply(stage, task, settings.calibration)
        wall = time.perf_counter() - t0
        assert why is None, why
        blocks = ctx.state.blocks
        left = None if blocks is None else len(blocks.kept)
        rows.append((label, wall, task.evaluate(ctx.lm.model)[0]["perplexity"], left))
    print(f"model {settings.model.name} ({settings.data.name}), load {load_s:.1f} s, {torch.get_num_threads()} threads\n")
    print("| stage | wall s | perplexity | vs dense | blocks left |\n|---|---|---|---|---|")
    for label, wall, p, left in rows:
        print(f"| {label} | {wall:.1f} | {p:.4f} | {p / ppl - 1:+.3%} | {'' if left is None else left} |")


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    try:
        main(sys.argv[1:])
    except UserError as e:  # a bad override: one line, as the command line says it
        sys.exit(print(f"bench_rotation: error: {e}", file=sys.stderr) or 2)
