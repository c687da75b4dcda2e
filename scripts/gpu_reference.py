"""CPU reference perplexities for `make gpu-check`'s end-to-end check, and the tolerance it allows.

    python scripts/gpu_reference.py [--out tests/data/gpu_reference.json]

Runs each reference command with `device=cpu` through the CLI and records every node's perplexity. A CUDA run
of the same command cannot match bit for bit: its kernels add in another order (matmul tiling, reductions,
softmax), so float32 sums differ in their last bits. Perplexity itself barely notices, but GPTQ and SparseGPT
feed every rounding or pruning decision back into the columns after it, so one decision that flips near a tie
changes the weights that follow. The tolerance is measured, not chosen: each command is re-run on CPU under
changes that are mathematically neutral and only reorder float32 additions,

- `threads=2` instead of `threads=1` (intra-op reductions split differently),
- the calibration segments fed in reverse order (each Hessian summed in another order),
- every weight of the loaded model moved by one float32 ulp in a random direction (what a kernel that rounds
  one operation differently does to its result, here applied to every input at once),

and each command's tolerance is MARGIN times the largest relative perplexity difference any of its nodes
showed, but at least FLOOR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "gpu_reference.json"

# Modest sizes so each CPU run takes about a minute on two cores; the GPU check runs the very same overrides.
COMMON = ["model=charllama", "data=shakespeare", "bits=4", "sparsity=0.5", "seed=0", "calibration.nsamples=16",
          "eval.max_windows=16", "eval.backends=none", "eval.latency.warmup=0", "eval.latency.repeats=1",
          "eval.latency.decode_tokens=0"]  # fmt: skip
COMMANDS = {
    "sparsegpt_gptq": ["stages=[sparsegpt,gptq]", "joint=[sparsegpt_gptq]"],
    "wanda_rtn": ["stages=[wanda,rtn]"],
}
PERTURBATIONS = {"threads=2": ["threads=2"], "reversed calibration": ["threads=1"], "1-ulp weights": ["threads=1"]}
MARGIN = 3.0
FLOOR = 1e-4  # evaluation alone (per-token float32 logits summed in another order) moves perplexity by ~1e-6

# Child-process patches, applied before the CLI runs (the package itself is not changed).
PATCHES = {
    "reversed calibration": (  # the same segments, summed into every Hessian in the opposite order
        "from compress_order.evaluation.tasks.lm import LMTask\n_orig = LMTask.calibration_batches\n"
        "LMTask.calibration_batches = lambda self: list(reversed(_orig(self)))\n"
    ),
    "1-ulp weights": (  # each float weight one ulp up or down, seeded
        "import torch, compress_order.loaders.models as M\n_load = M.causal_lm\n"
        "def causal_lm(*a, **k):\n"
        "    lm = _load(*a, **k); g = torch.Generator().manual_seed(1)\n"
        "    with torch.no_grad():\n"
        "        for p in lm.model.parameters():\n"
        "            up = torch.rand(p.shape, generator=g) < 0.5\n"
        "            p.copy_(torch.nextafter(p, torch.where(up, float('inf'), float('-inf')).to(p.dtype)))\n"
        "    return lm\n"
        "M.causal_lm = causal_lm\n"
    ),
}


def run_cli(overrides: list[str], run_dir: Path, patch: str = "") -> dict[str, float]:
    """Per-node perplexity of `compress-order run OVERRIDES` in a fresh folder and store."""
    prog = "import sys; from compress_order.cli.main import main\n" + patch + "sys.exit(main(sys.argv[1:]))"
    args = ["run", *overrides, f"hydra.run.dir={run_dir}", f"store_dir={run_dir / 'store'}"]
    proc = subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_reference: `compress-order {' '.join(args)}` failed:\n{proc.stderr[-2000:]}")
    return node_perplexity(run_dir / "results.parquet")


def node_perplexity(parquet: Path) -> dict[str, float]:
    import pandas as pd

    df = pd.read_parquet(parquet)
    bad = df[df["status"] != "ok"]
    if len(bad):
        raise SystemExit(
            f"gpu_reference: rows not ok in {parquet}: {bad[['order', 'metric', 'error']].to_dict('records')}"
        )
    ppl = df[(df["metric"] == "perplexity") & (df["backend"] == "dense-simulated")]
    return {str(o): float(v) for o, v in zip(ppl["order"], ppl["value"])}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    doc: dict = {"common": COMMON, "commands": COMMANDS, "perplexity": {}, "spread": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in COMMANDS.items():
            base = ["device=cpu", *COMMON, *extra]
            ref = run_cli([*base, "threads=1"], Path(tmp) / name)
            doc["perplexity"][name] = ref
            print(f"{name}: " + ", ".join(f"{k} {v:.5f}" for k, v in ref.items()), flush=True)
            for i, (label, over) in enumerate(PERTURBATIONS.items()):  # each in its own folder and store
                alt = run_cli([*base, *over], Path(tmp) / f"{name}-{i}", PATCHES.get(label, ""))
                doc["spread"].setdefault(label, {})[name] = {k: rel(alt[k], v) for k, v in ref.items()}
                print(f"  {label}: max relative difference {max(doc['spread'][label][name].values()):.2e}", flush=True)
    largest = {name: max(d for per in doc["spread"].values() for d in per[name].values()) for name in COMMANDS}
    doc["rel_tolerance"] = {name: max(MARGIN * x, FLOOR) for name, x in largest.items()}
    doc["tolerance_basis"] = (
        f"per command, {MARGIN:g} x the largest relative perplexity difference of any node between CPU runs that "
        f"differ only in float32 rounding ({', '.join(PERTURBATIONS)}: "
        + ", ".join(f"{n} {x:.2e}" for n, x in largest.items())
        + f"), at least {FLOOR:g}"
    )
    import torch
    import transformers

    doc["generated"] = {"by": "python scripts/gpu_reference.py", "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "date": datetime.now(timezone.utc).date().isoformat()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"tolerance: {doc['tolerance_basis']}; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
