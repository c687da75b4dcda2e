#!/usr/bin/env python
"""Cost of simulating quantized activations, per call, printed as a table.

Every evaluation and every later calibration pass rounds each compressed layer's input (compress_order/modeling/act.py),
so this runs once per layer per batch. The table gives the median milliseconds of `act.fake_quant` on one input
of tokens × channels for integer A8 per token, FP8 per token and NVFP4 groups of 16, beside the indexed codebook
search (formats.nearest_codes, what weights use) on the same values, and the ratio of each to the integer path,
all measured in this run.

    python scripts/bench_act.py --tokens 2048 --channels 576 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress_order.modeling.act import fake_quant  # noqa: E402
from compress_order.numerics.formats import codebook, nearest_codes  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.channels, generator=torch.Generator().manual_seed(0)) * 3
    scaled = x / (x.abs().amax(-1, keepdim=True) / 448)
    cases = {
        "int A8 per token": lambda: fake_quant(x, 8, "token"),
        "fp8 per token": lambda: fake_quant(x, 8, "token", fmt="fp8"),
        "fp8, indexed search": lambda: codebook(8)[nearest_codes(scaled, codebook(8))],
        "nvfp4 groups of 16": lambda: fake_quant(x, 4, "group", fmt="nvfp4"),
        "e2m1, indexed search": lambda: codebook(4)[nearest_codes(x, codebook(4))],
    }
    ms = {name: median_ms(fn, args.repeats) for name, fn in cases.items()}
    base = ms["int A8 per token"]
    print(f"fake-quantized activations, {args.tokens} × {args.channels}, {args.threads} thread(s), median of "
          f"{args.repeats}")  # fmt: skip
    print("| path | ms | × int A8 |\n|---|---:|---:|")
    for name, v in ms.items():
        print(f"| {name} | {v:.2f} | {v / base:.2f} |")
    return 0


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    sys.exit(main())
