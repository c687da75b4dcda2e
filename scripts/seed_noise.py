#!/usr/bin/env python
"""How much calibration seeds move results, and how many replicates an order verdict needs: writes a markdown page.

For each stage pair (default: the calibrated pairs of the README on the embedded char-LLaMA, 3 bits / 70%), one
run with `replicates=N` computes every seed-dependent node for N calibration seeds (seed-free nodes once). The page
gives each node's mean, sd and coefficient of variation over seeds, the order verdict of each seed alone
(evaluation windows only) against the verdict pooled over seeds (windows and seeds), and the replicates needed for
a t-interval over seeds to resolve an order effect of a given size.

    python scripts/seed_noise.py --replicates 5 --windows 64 --out docs/seed-noise.md
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress_order.analysis.bootstrap import order_differences  # noqa: E402
from compress_order.analysis.collect import collect  # noqa: E402

PAIRS = ["sparsegpt,gptq", "wanda,gptq", "wanda,rtn"]
EFFECTS = [0.02, 0.05, 0.1, 0.2, 0.5]


def replicates_needed(sd: float, effect: float, most: int = 100) -> int | None:
    """Smallest k whose 95% t-interval over k per-seed differences (sd `sd`) is narrower than ±`effect`."""
    if sd == 0:
        return 2
    for k in range(2, most + 1):
        if stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k) < effect:
            return k
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=5)
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows per node (eval.max_windows)")
    ap.add_argument("--pairs", nargs="+", default=PAIRS, help="stage lists, e.g. sparsegpt,gptq")
    ap.add_argument("--out", default="docs/seed-noise.md")
    ap.add_argument("overrides", nargs="*", default=["bits=3", "sparsity=0.7"], help="settings for every run")
    args = ap.parse_args()
    command = "python scripts/seed_noise.py " + " ".join(
        [f"--replicates {args.replicates}", f"--windows {args.windows}", "--pairs", *args.pairs, "--out", args.out,
         *args.overrides])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="seed_noise_") as tmp:
        runs = []
        for pair in args.pairs:
            out = Path(tmp) / pair.replace(",", "_")
            cmd = [sys.executable, "-m", "compress_order", "run", f"stages=[{pair}]", f"replicates={args.replicates}",
                   f"eval.max_windows={args.windows}", "eval.backends=none", "eval.latency.repeats=1",
                   "eval.latency.decode_tokens=0", f"store_dir={Path(tmp) / 'store'}", f"hydra.run.dir={out}",
                   *args.overrides]  # fmt: skip
            print("+", " ".join(cmd[2:]), file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"run failed:\n{done.stderr[-3000:]}")
            runs.append(out)
        df = collect(runs)
        ppl = df[(df["metric"] == "perplexity") & (df["backend"] == "dense-simulated") & (df["status"] == "ok")]
        nodes = ppl.groupby(["stages", "order"], sort=False)["value"].agg(["mean", "std", "min", "max", "count"])
        nodes["cv %"] = 100 * nodes["std"] / nodes["mean"]
        pooled = order_differences(df, "perplexity")
        per_seed = pd.concat([order_differences(df[df["seed"] == s], "perplexity").assign(seed=s)
                              for s in sorted(df["seed"].unique())], ignore_index=True)  # fmt: skip

    lines = [
        "# Calibration-seed noise on the embedded model",
        "",
        f"Regenerate with `{command}` (embedded char-LLaMA on Shakespeare, {args.windows} evaluation windows a node,",
        f"{args.replicates} calibration seeds each: `replicates={args.replicates}`). Nothing below is typed in.",
        "",
        "## Each node over seeds (perplexity)",
        "",
        "Seed-free nodes (dense, magnitude, rtn) have one value for every seed: sd 0.",
        "",
        nodes.reset_index().to_markdown(index=False, floatfmt=".4g"),
        "",
        "## Order verdicts: one seed at a time against pooled over seeds",
        "",
        "`diff` is how much lower the first order's perplexity is than the second's; a single seed's interval covers",
        "evaluation windows only, the pooled one windows and seeds (see docs/analysis.md).",
        "",
    ]
    rows = []
    for _, p in pooled.iterrows():
        mine = per_seed[(per_seed["stages"] == p["stages"]) & (per_seed["order_a"] == p["order_a"])
                        & (per_seed["order_b"] == p["order_b"])]  # fmt: skip
        sd = float(p["seed_sd"]) if not pd.isna(p["seed_sd"]) else float("nan")
        rows.append({
            "stages": p["stages"], "comparison": f"{p['order_a']} vs {p['order_b']}",
            "per-seed diff": ", ".join(f"{v:.3g}" for v in mine["diff"]),
            "seeds significant alone": f"{int(mine['significant'].sum())}/{len(mine)}",
            "pooled diff [95% CI]": f"{p['diff']:.3g} [{p['low']:.3g}, {p['high']:.3g}]",
            "pooled significant": "yes" if p["significant"] else "no", "sd over seeds": sd,
            **{f"k for ±{e:g}": replicates_needed(sd, e) or ">100" for e in EFFECTS},
        })  # fmt: skip
    table = pd.DataFrame(rows)
    alone = int(per_seed["significant"].sum())
    seed0 = per_seed[per_seed["seed"] == per_seed["seed"].min()]
    survive = int((seed0.merge(pooled, on=["stages", "order_a", "order_b"], suffixes=("", "_p"))
                   .query("significant").eval("significant_p & (diff * diff_p > 0)")).sum())  # fmt: skip
    lines += [
        table.to_markdown(index=False, floatfmt=".3g"),
        "",
        f"- Comparisons significant for a single seed (windows only): {alone} of {len(per_seed)}.",
        f"- Of the {int(seed0['significant'].sum())} verdicts that seed {int(seed0['seed'].min())} alone calls "
        f"significant (what a single-seed run reports), {survive} survive pooling over {args.replicates} seeds "
        "with the same sign.",
        "- `k for ±δ`: calibration seeds needed for the t-interval over per-seed differences (sd as measured) to be",
        "  narrower than ±δ perplexity, i.e. to resolve an order effect of size δ (window noise comes on top).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    main()
