#!/usr/bin/env python
"""A grid with one shared node store against the same grid with none, from one run: evaluations, stage
applications and wall time of each, and their ratios.

The grid is the `mini_lm` experiment (embedded char-LLaMA, magnitude & RTN, bits 2-4 × sparsity 0.3-0.7: 9 jobs,
45 nodes, 25 distinct), every node evaluated on all 403 validation windows (about 5 minutes in all on 2 cores).
With fewer windows (`--windows 32`) the fixed cost of each job (loading the model, tokenizing the text) weighs
more, and the wall-time ratio moves towards 1 while the evaluation count stays 25 against 45.
Jobs run one after another (the basic launcher), so the times compare work, not parallelism. The shared sweep
also shares inner-node states (`state_cache.dir`), so a job reloads a stored prefix's weights instead of
re-applying its stage; `--no-state-cache` measures the store alone.

    python scripts/bench_sweep.py              # all windows
    python scripts/bench_sweep.py --windows 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress_order.core.schema import STATS_FILE  # noqa: E402


def sweep(folder: Path, store: str, windows: int, threads: int, extra: list[str]) -> dict:
    cmd = [
        sys.executable, "-m", "compress_order", "run", "-m", "experiment=mini_lm", f"eval.max_windows={windows or 'null'}",
        "eval.backends=none", "eval.latency.repeats=2", "eval.latency.decode_tokens=0", f"threads={threads}",
        f"store_dir={store}", f"hydra.sweep.dir={folder}", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=folder.parent)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"sweep failed ({out.returncode}):\n{out.stderr[-3000:]}")
    stats = [json.loads(p.read_text()) for p in folder.rglob(STATS_FILE)]
    return {
        "jobs": len(stats), "nodes": sum(s["nodes"] for s in stats),
        "evaluations": sum(s["evaluations"] for s in stats), "applications": sum(s["applications"] for s in stats),
        "wall_s": wall,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=0, help="evaluation windows per node (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-state-cache", action="store_true", help="share evaluated nodes only, not inner states")
    ap.add_argument("overrides", nargs="*", help="extra overrides for both sweeps")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        tmp_path = Path(tmp)
        cache = [] if args.no_state_cache else [f"state_cache.dir={tmp_path / 'states'}"]
        shared = sweep(tmp_path / "shared", str(tmp_path / "store"), args.windows, args.threads, args.overrides + cache)
        unshared = sweep(tmp_path / "unshared", "null", args.windows, args.threads, args.overrides)
    what = "evaluated nodes" + ("" if args.no_state_cache else " and inner-node states")
    print(f"mini_lm grid, {args.windows or 'all'} windows a node, jobs in sequence ({shared['jobs']} jobs, {shared['nodes']} "
          f"nodes); the shared sweep shares {what}\n")  # fmt: skip
    print("| sweep | evaluations | stage applications | wall s |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in (("one shared store", shared), ("no store (unshared)", unshared)):
        print(f"| {name} | {r['evaluations']} | {r['applications']} | {r['wall_s']:.1f} |")
    print(
        f"| shared ÷ unshared | {shared['evaluations'] / unshared['evaluations']:.2f} | "
        f"{shared['applications'] / max(unshared['applications'], 1):.2f} | {shared['wall_s'] / unshared['wall_s']:.2f} |"
    )


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    main()
