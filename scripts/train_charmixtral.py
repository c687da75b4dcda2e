#!/usr/bin/env python
"""Build the embedded mixture-of-experts miniature: the char-LLaMA's feed-forward layers split into experts.

MoEfication (Zhang et al., 2022): each dense SwiGLU FFN of ``compress_order/assets/charllama`` (intermediate 512)
is cut into ``--experts`` groups of its neurons (128 each for 4), which become the experts of a Mixtral layer
(fused ``gate_up_proj`` / ``down_proj``, transformers 5); each expert's router row starts as the mean gate row of
its neurons, so a token goes to the experts whose neurons it drives. With top-2 of 4 only half the neurons fire,
so the model is then fine-tuned for ``--steps`` on the same Shakespeare split (attention and embeddings included)
with the char-LLaMA's recipe. Writes ``compress_order/assets/charmixtral/`` (loads offline with
``from_pretrained``) and ``training.json``; validation as in scripts/train_charllama.py.

    python scripts/train_charmixtral.py                # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from train_charllama import (DATA_DIR, REPO_ROOT, SEQ_LEN, encode, lr_at, param_groups, portable_tokenizer_config,
                             sha256_file, validation_ppl)

DENSE = REPO_ROOT / "compress_order" / "assets" / "charllama"
DEFAULT_OUT = REPO_ROOT / "compress_order" / "assets" / "charmixtral"


@torch.no_grad()
def moefy(dense: torch.nn.Module, experts: int, top_k: int) -> MixtralForCausalLM:
    """A Mixtral whose experts partition each dense FFN's neurons (contiguous groups: a random init has no order
    to exploit), with every other weight copied."""
    dc = dense.config
    inter = dc.intermediate_size // experts
    cfg = MixtralConfig(vocab_size=dc.vocab_size, hidden_size=dc.hidden_size, intermediate_size=inter,
                        num_hidden_layers=dc.num_hidden_layers, num_attention_heads=dc.num_attention_heads,
                        num_key_value_heads=dc.num_key_value_heads, max_position_embeddings=SEQ_LEN,
                        num_local_experts=experts, num_experts_per_tok=top_k, tie_word_embeddings=False,
                        rms_norm_eps=dc.rms_norm_eps, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                        router_aux_loss_coef=0.01, output_router_logits=False)  # fmt: skip
    moe = MixtralForCausalLM(cfg)
    state = moe.state_dict()
    for name, value in dense.state_dict().items():
        if ".mlp." not in name:
            state[name].copy_(value)
    for i, layer in enumerate(dense.model.layers):
        mlp, block = layer.mlp, moe.model.layers[i].mlp
        for e in range(experts):
            rows = slice(e * inter, (e + 1) * inter)
            block.experts.gate_up_proj[e].copy_(torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows]]))
            block.experts.down_proj[e].copy_(mlp.down_proj.weight[:, rows])
            block.gate.weight[e].copy_(mlp.gate_proj.weight[rows].mean(0))
    return moe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DENSE)
    dense = AutoModelForCausalLM.from_pretrained(DENSE, dtype=torch.float32)
    train_text = (DATA_DIR / "train.txt").read_text(encoding="ascii")
    valid_text = (DATA_DIR / "valid.txt").read_text(encoding="ascii")
    train_ids, valid_ids = encode(tok, train_text), encode(tok, valid_text)
    dense_ppl = validation_ppl(dense, valid_ids)
    model = moefy(dense, args.experts, args.top_k)
    moefied_ppl = validation_ppl(model, valid_ids)
    print(f"dense {dense_ppl:.4f}  moefied (before fine-tuning) {moefied_ppl:.4f}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed + 1)
    max_start = train_ids.numel() - SEQ_LEN
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup, 0.1)
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch, output_router_logits=True)  # + the load-balancing loss
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps}  loss {out.loss.item():.4f}  "
                  f"{(time.perf_counter() - t0) / (step + 1):.2f}s/step", flush=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    final = validation_ppl(model, valid_ids)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    portable_tokenizer_config(args.out / "tokenizer_config.json")
    reloaded = validation_ppl(AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32), valid_ids)
    if abs(reloaded - final) > 1e-4:
        raise AssertionError(f"reloaded checkpoint ppl {reloaded} != trained {final}")
    record = {
        "model": {"architecture": "MixtralForCausalLM", "from": "charllama, FFN neurons split into experts "
                  "(MoEfication)", "experts": args.experts, "top_k": args.top_k,
                  "expert_intermediate_size": model.config.intermediate_size,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": SEQ_LEN, "lr": args.lr,
                     "warmup_steps": args.warmup, "router_aux_loss_coef": 0.01, "seed": args.seed,
                     "threads": args.threads, "train_seconds": round(seconds, 1)},
        "validation": {"dense_charllama": round(dense_ppl, 4), "moefied_before_training": round(moefied_ppl, 4),
                       "perplexity": round(final, 4), "windows": valid_ids.numel() // SEQ_LEN},
        "data": {"train_sha256": sha256_file(DATA_DIR / "train.txt")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }  # fmt: skip
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"final valid ppl {final:.4f}  train {seconds:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
