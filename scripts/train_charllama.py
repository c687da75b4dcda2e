#!/usr/bin/env python
"""Train the embedded offline default model: a tiny character-level LLaMA.

Reads ``compress_order/assets/shakespeare/{train,valid}.txt`` (made by
``scripts/prepare_shakespeare.py``) and writes a Hugging Face checkpoint into
``compress_order/assets/charllama/`` that loads offline with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``,
plus ``training.json`` describing the run.

Training is a fixed number of steps with seeded data sampling and
deterministic torch algorithms, so a re-run on the same machine/thread count
reproduces the weights.

Validation protocol (shared with the runner): tokenise valid.txt as one
sequence, cut into non-overlapping 256-token windows (tail dropped), mean
next-token NLL over all windows (255 predictions each), ppl = exp(mean NLL).

Usage:
    python scripts/train_charllama.py                  # full run
    python scripts/train_charllama.py --time-steps 20  # time a few steps, save nothing
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "compress_order" / "assets" / "shakespeare"
DEFAULT_OUT = REPO_ROOT / "compress_order" / "assets" / "charllama"

UNK = "<unk>"
SEQ_LEN = 256  # training window == eval window == max_position_embeddings


def build_tokenizer(text: str) -> Tokenizer:
    """One token per character; ``<unk>`` is id 0, then the characters in sorted order."""
    vocab = {UNK: 0}
    for ch in sorted(set(text)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every character (incl. space/newline); the default whitespace
    # pre-tokenizers would drop whitespace and break the round trip.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # WordLevel's default decoding joins tokens with spaces; Fuse concatenates them.
    tok.decoder = decoders.Fuse()
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    # No BOS/EOS/PAD: the model is a plain character LM, and the runner feeds raw windows.
    # clean_up_tokenization_spaces=False, else decode() rewrites " ." -> "." etc.
    # model_max_length left unset (huge) so tokenising a whole file does not warn.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def check_round_trip(hf_tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = hf_tok(text, add_special_tokens=True)["input_ids"]
    if len(ids) != len(text):
        raise AssertionError(f"expected {len(text)} ids, got {len(ids)}")
    if hf_tok.unk_token_id in ids:
        raise AssertionError("in-vocabulary text produced <unk>")
    if hf_tok.decode(ids) != text:
        raise AssertionError("decode(encode(text)) != text")


def encode(hf_tok: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def validation_ppl(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int = SEQ_LEN, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over non-overlapping seq_len windows of ``ids`` (tail dropped)."""
    was_training = model.training
    model.eval()
    n_win = ids.numel() // seq_len
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    total_nll, total_tok = 0.0, 0
    for start in range(0, n_win, batch_size):
        batch = windows[start : start + batch_size]
        # HF loss is the mean over batch*(seq_len-1) shifted predictions; all
        # windows have equal length, so weighting by that count gives the exact mean.
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (seq_len - 1)
        total_nll += loss.double().item() * n
        total_tok += n
    model.train(was_training)
    return math.exp(total_nll / total_tok)


def lr_at(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio * peak``; ``step`` is 0-based."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_model(vocab_size: int, args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        # LlamaConfig defaults bos=1/eos=2, which here would be real characters.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay weight matrices only; decaying RMSNorm gains just fights the norm.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def portable_tokenizer_config(path: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", unknown to 4.x;
    "PreTrainedTokenizerFast" loads the same tokenizer.json in both."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_reload(out: Path, valid_text: str) -> float:
    """Load the saved files the way the runner does and recompute validation ppl."""
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    check_round_trip(tok, valid_text[:2000])
    return validation_ppl(model, encode(tok, valid_text))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--intermediate-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps, then exit without saving")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        print(f"warning: deterministic algorithms unavailable: {exc}", file=sys.stderr)

    train_path, valid_path = args.data_dir / "train.txt", args.data_dir / "valid.txt"
    train_text = train_path.read_text(encoding="ascii")
    valid_text = valid_path.read_text(encoding="ascii")

    tok = build_tokenizer(train_text + valid_text)
    hf_tok = wrap_tokenizer(tok)
    check_round_trip(hf_tok, "ROMEO.\nBut, soft! what light through yonder window breaks?\n\n  x")
    train_ids, valid_ids = encode(hf_tok, train_text), encode(hf_tok, valid_text)

    model = make_model(len(hf_tok), args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(hf_tok)}  params {n_params:,}  train tokens {train_ids.numel():,}  valid tokens {valid_ids.numel():,}")

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    # Separate generator so data order does not depend on how many random
    # numbers model init consumed.
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    steps = args.time_steps or args.steps
    max_start = train_ids.numel() - SEQ_LEN
    history: list[dict] = []

    model.train()
    t0 = time.perf_counter()
    eval_time = 0.0
    for step in range(steps):
        lr = lr_at(step, steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=data_gen)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()

        done = step + 1
        if done % args.log_every == 0 or done == steps:
            elapsed = time.perf_counter() - t0 - eval_time
            print(f"step {done:5d}/{steps}  loss {loss.item():.4f}  lr {lr:.2e}  {elapsed / done:.3f}s/step", flush=True)
        if not args.time_steps and (done % args.eval_every == 0 or done == steps):
            te = time.perf_counter()
            ppl = validation_ppl(model, valid_ids)
            eval_time += time.perf_counter() - te
            history.append({"step": done, "train_loss": round(loss.item(), 4), "valid_ppl": round(ppl, 4)})
            print(f"step {done:5d}  valid ppl {ppl:.4f}", flush=True)

    train_seconds = time.perf_counter() - t0 - eval_time
    if args.time_steps:
        print(f"{steps} steps in {train_seconds:.1f}s -> {train_seconds / steps:.3f}s/step")
        return 0

    final_ppl = validation_ppl(model, valid_ids)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    hf_tok.save_pretrained(args.out)
    portable_tokenizer_config(args.out / "tokenizer_config.json")
    reloaded_ppl = check_reload(args.out, valid_text)
    if abs(reloaded_ppl - final_ppl) > 1e-4:
        raise AssertionError(f"reloaded checkpoint ppl {reloaded_ppl} != trained {final_ppl}")

    record = {
        "model": {
            "architecture": "LlamaForCausalLM",
            "vocab_size": len(hf_tok),
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": SEQ_LEN,
            "tie_word_embeddings": False,
            "parameters": n_params,
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": SEQ_LEN,
            "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8), weight decay on >=2-D params only",
            "lr": args.lr,
            "warmup_steps": args.warmup,
            "schedule": f"linear warmup, cosine decay to {args.min_lr_ratio} x lr",
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "seed": args.seed,
            "threads": args.threads,
            "train_seconds": round(train_seconds, 1),
            "eval_history": history,
        },
        "validation": {
            "protocol": "valid.txt as one sequence; non-overlapping 256-token windows, tail dropped; "
            "mean next-token NLL (255 per window); ppl = exp(mean NLL)",
            "windows": valid_ids.numel() // SEQ_LEN,
            "perplexity": round(final_ppl, 4),
        },
        "data": {
            "train_sha256": sha256_file(train_path),
            "valid_sha256": sha256_file(valid_path),
            "train_tokens": train_ids.numel(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"final valid ppl {final_ppl:.4f}  train {train_seconds:.0f}s  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
