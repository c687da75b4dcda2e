#!/usr/bin/env python
"""Calibration time of an MoE block against a dense block of the same total weight, printed as a table.

Two random one-block models with the same attention and the same FFN weight: a Mixtral block with E experts of
intermediate I (top-k routing) and a LLaMA block with intermediate E·I. Each stage is applied to the dense weights
through the generic driver (calibration.calibrate_and_compress) on the same token batches; the table gives the
median seconds per block over the repeats and the MoE/dense ratio measured in this run. The MoE block gathers one
statistic per expert, from the tokens routed to it (k/E of them on average), and its solver runs E smaller
problems; the dense block runs one large one.

    python scripts/bench_moe.py --hidden 256 --experts 8 --expert-intermediate 128 --tokens 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress_order.stages.calibration import calibrate_and_compress  # noqa: E402
from compress_order.stages.gptq import GPTQ  # noqa: E402
from compress_order.stages.sparsegpt import SparseGPT  # noqa: E402
from compress_order.stages.wanda import Wanda  # noqa: E402
from compress_order.modeling.targets import ModelState, find_targets  # noqa: E402

SKIP = ["lm_head", r"\.(gate|router)$"]


def models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=args.seqlen, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    moe = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=args.expert_intermediate,
                                                 num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                                                 **common))  # fmt: skip
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=args.experts * args.expert_intermediate, **common))
    return {"moe": moe.eval(), "dense": dense.eval()}


def ffn_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n and not n.endswith("gate.weight"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-intermediate", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (segments × seqlen)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    built = models(args)
    assert ffn_weights(built["moe"]) == ffn_weights(built["dense"])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (1, args.seqlen), generator=gen) for _ in range(args.tokens // args.seqlen)]
    stages = {"wanda": lambda: Wanda(0.5, name="wanda"), "sparsegpt": lambda: SparseGPT(0.5, name="sparsegpt"),
              "gptq": lambda: GPTQ(4, group_size=64, name="gptq")}  # fmt: skip
    rows = []
    for sname, make in stages.items():
        secs: dict[str, float] = {}
        for kind, model in built.items():
            targets = find_targets(model, SKIP)
            state = ModelState(model, targets)
            dense = state.snapshot()
            times = []
            for _ in range(args.repeats):
                state.restore(dense)
                t0 = time.perf_counter()
                calibrate_and_compress(model, targets, batches, make())
                times.append(time.perf_counter() - t0)
            state.restore(dense)
            secs[kind] = statistics.median(times)
        rows.append((sname, secs["dense"], secs["moe"], secs["moe"] / secs["dense"]))

    print(f"one block, hidden {args.hidden}; MoE: {args.experts} experts × intermediate {args.expert_intermediate}, "
          f"top-{args.top_k}; dense: intermediate {args.experts * args.expert_intermediate} (same FFN weight: "
          f"{ffn_weights(built['dense']):,}); {args.tokens} calibration tokens; median of {args.repeats}, "
          f"{args.threads} threads\n")  # fmt: skip
    print("| stage | dense block s | MoE block s | MoE / dense |")
    print("|---|---:|---:|---:|")
    for sname, d, m, r in rows:
        print(f"| {sname} | {d:.3f} | {m:.3f} | {r:.2f}× |")
    return 0


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    sys.exit(main())
