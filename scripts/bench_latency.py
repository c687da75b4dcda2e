"""Latency of the dense model vs each packed backend, with speed-up ratios measured in one run.

    python scripts/bench_latency.py [--device cpu] [--threads 2] [--bits 4] [--group-size 128]

Models: the embedded char-LLaMA (if its checkpoint is present) and a randomly initialised LLaMA-shaped model
(~100M parameters). Each is RTN-quantized (so every backend can pack it), then timed dense and per backend:
prefill (batch × sequence forward) and decode (ms per token with a KV cache). Speed-ups are against the dense
model timed in the same process, in the backend's activation dtype (a
bf16 kernel against the dense model cast to bf16). Backends that cannot run print n/a with the reason.
"""

from __future__ import annotations

import argparse
import copy

import pandas as pd
import torch

from compress_order.evaluation.backends import BACKENDS, dtype_name, model_dtype, select_backends
from compress_order.evaluation.measure import decode_ms_per_token, time_call
from compress_order.core.paths import ASSETS_DIR
from compress_order.stages.rtn import RTN
from compress_order.modeling.targets import find_targets


def models(include_large: bool) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    out = {}
    if (ASSETS_DIR / "charllama" / "config.json").is_file():
        out["charllama"] = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "charllama", dtype=torch.float32)
    if include_large:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
        out["llama-100m-random"] = LlamaForCausalLM(cfg)
    return {k: m.eval() for k, m in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-large", action="store_true", help="skip the ~100M-parameter model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name, model in models(not args.no_large).items():
        model.to(device)
        targets = find_targets(model, ["lm_head"])
        for t in targets.values():
            RTN(args.bits, args.group_size, False, name="rtn").compress(t)
        x = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), device=device)

        def timings(m: torch.nn.Module) -> tuple[float, float]:
            prefill, _ = time_call(lambda: m(input_ids=x, use_cache=False), device, 2, args.repeats)
            decode = decode_ms_per_token(m, x[:, :32], args.new_tokens, device, 1, max(3, args.repeats // 3))
            return prefill, decode

        here = model_dtype(targets)
        refs = {here: timings(model)}  # the dense node in each activation dtype a backend computes in
        rows.append({"model": name, "backend": f"dense ({dtype_name(here)}, simulated)", "prefill_ms": refs[here][0],
                     "decode_ms_per_token": refs[here][1], "prefill_speedup": 1.0, "decode_speedup": 1.0, "note": ""})
        for b in BACKENDS.values():
            note, t = "", None
            act = b.act_dtype(here, device)
            if b not in select_backends("auto", device):
                note = f"n/a: no kernel on {device.type}"
            elif (why := b.fits(targets)) is not None:
                note = f"n/a: {why}"
            else:
                try:
                    t = timings(b.convert(model, targets, device))
                    if act not in refs:
                        refs[act] = timings(copy.deepcopy(model).to(act))
                        rows.append({"model": name, "backend": f"dense ({dtype_name(act)})", "prefill_ms": refs[act][0],
                                     "decode_ms_per_token": refs[act][1], "prefill_speedup": 1.0,
                                     "decode_speedup": 1.0, "note": ""})  # fmt: skip
                except (RuntimeError, NotImplementedError, ImportError) as e:
                    note = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            ref = refs.get(act)
            rows.append({"model": name, "backend": b.label(here, device), "prefill_ms": t[0] if t else None,
                         "decode_ms_per_token": t[1] if t else None,
                         "prefill_speedup": ref[0] / t[0] if t else None,
                         "decode_speedup": ref[1] / t[1] if t else None, "note": note})  # fmt: skip
    print(f"device={device} threads={args.threads} batch={args.batch} seqlen={args.seqlen} "
          f"bits={args.bits} group_size={args.group_size} torch={torch.__version__}")  # fmt: skip
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    from compress_order.core.quiet import quiet_third_party

    quiet_third_party()  # as the command line does: third-party notices a user cannot act on
    main()
