"""The checks of `make gpu-check` (scripts/gpu_check.py runs each one in its own process with a timeout).

    python scripts/gpu_checks.py NAME [--device cuda] [--small]

Each check writes {"status", "reason", "figures"} to the file named by $GPU_CHECK_RESULT (or prints it).
`--device cpu --small` runs the same code paths on a CPU with smaller models: a dry run of the plumbing, not
a check of anything CUDA does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "gpu_reference.json"
OUT = Path(os.environ.get("GPU_CHECK_OUT", ROOT / "gpu_check"))
DEVICE = "cuda"
SMALL = False


class Failed(Exception):
    """The check ran and found something wrong."""


class Skipped(Exception):
    """The check cannot run here (the reason says why)."""



def _failure(what: str, e: Exception) -> str:
    """A path that raised: its traceback to the log, one line for the report."""
    import traceback

    traceback.print_exc()
    return f"{what}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"

def _table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table (report.md shows figures whose value starts with '|' as tables)."""
    fmt = [[f"{v:.5g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in fmt])


def progress(figures: dict) -> None:
    """Figures so far, for the report of a check that is cut off by its timeout."""
    dest = os.environ.get("GPU_CHECK_RESULT")
    if dest:
        Path(dest).write_text(json.dumps({"status": "running", "figures": figures}, default=str))


def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def run_cli(overrides: list[str], run_dir: Path) -> "pd.DataFrame":  # noqa: F821
    """`compress-order run OVERRIDES` in a fresh folder and store; its tidy rows. A run that breaks an
    invariant stops with an error (the runner checks every layer after every stage), so it fails here."""
    import shutil

    import pandas as pd

    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["run", *overrides, f"hydra.run.dir={run_dir}", f"store_dir={run_dir / 'store'}"]
    print("$ compress-order " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "compress_order", *args], cwd=ROOT)
    if proc.returncode != 0:
        raise Failed(f"`compress-order {' '.join(args[:4])} ...` exited {proc.returncode} (see the log)")
    df = pd.read_parquet(run_dir / "results.parquet")
    bad = df[df["status"] != "ok"]
    if len(bad):
        raise Failed(f"rows not ok: {bad[['order', 'metric', 'error']].head(3).to_dict('records')}")
    return df


def metric(df, name: str) -> dict[str, float]:
    """{node label: value} of a dense-simulated metric."""
    rows = df[(df["metric"] == name) & (df["backend"] == "dense-simulated")]
    return {str(o): float(v) for o, v in zip(rows["order"], rows["value"])}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- 1 ----------------------------------------------------------------------------------------------------------


def cuda_tests() -> dict:
    """The suite's CUDA tests (every test whose name mentions cuda, in the files that use CUDA) on this device."""
    files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py")) if "cuda" in p.read_text()]
    xml = OUT / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", f"--junitxml={xml}",
           *files]  # fmt: skip
    try:
        import pytest_timeout  # noqa: F401

        cmd.append("--timeout=120")
    except ImportError:
        pass
    proc = subprocess.run(cmd, cwd=ROOT)
    if not xml.is_file():
        raise Failed(f"pytest exited {proc.returncode} without a report")
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(xml).iter("testcase"):
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, why = ("skipped" if tag == "skipped" else "failed"), (el.get("message") or "")[:120]
        counts[outcome] += 1
        rows.append([f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", outcome,
                     float(case.get("time", 0)), why])  # fmt: skip
    figures = {**counts, "tests": _table(["test", "outcome", "seconds", "message"], rows)}
    if counts["failed"] or proc.returncode not in (0, 5):
        raise Failed(f"{counts['failed']} CUDA test(s) failed", figures)
    if not counts["passed"]:
        raise Failed("no CUDA test passed (all skipped: is torch's CUDA usable?)", figures)
    return figures


# --- 2 ----------------------------------------------------------------------------------------------------------


def _e2e_dir(name: str) -> Path:
    return OUT / "runs" / f"{name}-{DEVICE}"


def _compare(name: str, got: dict[str, float], ref: dict[str, float]) -> tuple[list[list], float]:
    """Rows [command, node, reference, got, relative difference] and the largest difference."""
    if set(got) != set(ref):
        raise Failed(f"{name}: nodes {sorted(got)} != {sorted(ref)}")
    rows = [[name, node, ref[node], got[node], rel(got[node], ref[node])] for node in ref]
    worst = max(r[-1] for r in rows)
    return rows, worst


def end_to_end() -> dict:
    """Both reference commands on the device; invariants hold (the run completes) and every node's perplexity is
    within the recorded tolerance of the CPU reference."""
    ref = reference()
    target = float(next(o.split("=")[1] for o in ref["common"] if o.startswith("sparsity=")))
    rows, over, sparsity_ok = [], [], True
    for name, extra in ref["commands"].items():
        tol = float(ref["rel_tolerance"][name])
        df = run_cli([f"device={DEVICE}", *ref["common"], *extra], _e2e_dir(name))
        r, worst = _compare(name, metric(df, "perplexity"), ref["perplexity"][name])
        rows += [row + [tol] for row in r]
        progress({"perplexity": _table(["command", "node", "cpu (reference)", DEVICE, "rel diff", "tolerance"], rows)})
        if worst > tol:
            over.append(f"{name} by {worst:.2e} > {tol:.2e}")
        pruned = {k: v for k, v in metric(df, "sparsity").items() if any(p in k for p in ("sparsegpt", "wanda"))}
        sparsity_ok &= all(v >= target - 1e-9 for v in pruned.values())
    header = ["command", "node", "cpu (reference)", DEVICE, "rel diff", "tolerance"]
    import torch
    import transformers

    gen = ref["generated"]
    figures = {"tolerance_basis": ref["tolerance_basis"], "max_rel_diff": max(r[4] for r in rows),
               "libraries": f"reference: torch {gen['torch']}, transformers {gen.get('transformers')}; "
                            f"here: torch {torch.__version__}, transformers {transformers.__version__}",
               "perplexity": _table(header, rows)}  # fmt: skip
    if not sparsity_ok:
        raise Failed("a pruned node's sparsity is below its target", figures)
    if over:
        raise Failed(f"perplexity differs from the CPU reference: {'; '.join(over)}", figures)
    return figures


# --- 3 ----------------------------------------------------------------------------------------------------------


SPARSITY_SLACK = 1e-3  # ~1,600 of the char-LLaMA's 1.57M compressed weights: far beyond a few flipped ties


def calibration_device() -> dict:
    """The model on the CPU, each block calibrated on the device: the same nodes as the all-device run. The pruning
    masks keep the same counts (same avg_bits); the blocks' inputs (embeddings, rotary tables) come from the CPU,
    so a few GPTQ roundings near a tie may land elsewhere: sparsity (which counts weights rounded to zero) within
    SPARSITY_SLACK, perplexity (evaluated on the CPU) within the end-to-end tolerance."""
    ref = reference()
    name = "sparsegpt_gptq"
    base = [*ref["common"], *ref["commands"][name]]
    full = _e2e_dir(name) / "results.parquet"
    if full.is_file():  # the end_to_end check's run of the same command
        import pandas as pd

        on_dev = pd.read_parquet(full)
    else:
        on_dev = run_cli([f"device={DEVICE}", *base], _e2e_dir(name))
    streamed = run_cli(["device=cpu", f"calibration.device={DEVICE}", *base], OUT / "runs" / f"{name}-streamed")
    tol = float(ref["rel_tolerance"][name])
    rows, worst = _compare(name, metric(streamed, "perplexity"), metric(on_dev, "perplexity"))
    s_dev, s_str = metric(on_dev, "sparsity"), metric(streamed, "sparsity")
    b_dev, b_str = metric(on_dev, "avg_bits"), metric(streamed, "avg_bits")
    for r in rows:
        r += [s_dev[r[1]], s_str[r[1]], b_str[r[1]]]
    figures = {"max_rel_diff": worst, "rel_tolerance": tol,
               "nodes": _table(["command", "node", f"all on {DEVICE}", "cpu + streamed", "rel diff",
                                f"sparsity {DEVICE}", "sparsity streamed", "avg_bits"], rows)}  # fmt: skip
    if any(abs(s_dev[k] - s_str[k]) > SPARSITY_SLACK or b_dev[k] != b_str[k] for k in s_dev):
        raise Failed("streamed calibration gave other masks or grids (sparsity / avg_bits differ)", figures)
    if worst > tol:
        raise Failed(f"perplexity differs from the all-{DEVICE} run by {worst:.2e} > {tol:.2e}", figures)
    return figures


# --- 4 ----------------------------------------------------------------------------------------------------------

HALF_BOUND = 0.10  # a half-precision node within 10% of fp32: a broken path (overflow, a bad cast) lands far off


def half_precision() -> dict:
    """fp16 and bf16 models through the same stages; perplexities beside fp32."""
    ref = reference()
    name = "sparsegpt_gptq"
    base = [f"device={DEVICE}", *ref["common"], *ref["commands"][name]]
    ppl = {}
    full = _e2e_dir(name) / "results.parquet"
    if full.is_file():
        import pandas as pd

        ppl["float32"] = metric(pd.read_parquet(full), "perplexity")
    else:
        ppl["float32"] = metric(run_cli(base, _e2e_dir(name)), "perplexity")
    failures = []
    for dtype in ("float16", "bfloat16"):
        try:
            ppl[dtype] = metric(
                run_cli([*base, f"model.dtype={dtype}"], OUT / "runs" / f"{name}-{dtype}"), "perplexity"
            )
        except Failed as e:
            failures.append(f"{dtype}: {e}")
            ppl[dtype] = {}
    nodes = list(ppl["float32"])
    rows = [[n] + [ppl[d].get(n, float("nan")) for d in ("float32", "float16", "bfloat16")] for n in nodes]
    figures = {
        "perplexity": _table(["node", "fp32", "fp16", "bf16"], rows),
        "bound": f"within {HALF_BOUND:.0%} of fp32",
    }
    if failures:
        raise Failed("; ".join(failures), figures)
    off = [f"{d} {n} {ppl[d][n]:.4g}" for d in ("float16", "bfloat16") for n in nodes
           if not math.isfinite(ppl[d][n]) or rel(ppl[d][n], ppl["float32"][n]) > HALF_BOUND]  # fmt: skip
    if off:
        raise Failed(f"far from fp32: {', '.join(off)}", figures)
    return figures


# --- 5 ----------------------------------------------------------------------------------------------------------

# Relative error ‖packed − evaluated‖ / ‖evaluated‖ of the logits. Each model is compressed onto a grid its
# kernel can store (int8: 8-bit symmetric per channel; int4: 4-bit groups of 64; 2:4: magnitude 2:4), and each
# backend packs the node's own codes, scales and zero-points. bf16 (int4, unit roundoff 2^-8 ≈ 4e-3, scales also
# in bf16) and fp16 (2:4, 2^-11 ≈ 5e-4) round every activation and the error grows over the layers: the bounds are
# about ten times one rounding of the dtype. int8 keeps float32 activations and the node's exact codes: only the
# order of float32 sums differs (4e-7 at the logits of the embedded model on the CPU kernel).
KERNEL_TOL = {"int8_weight_only": 0.005, "int4_weight_only": 0.05, "sparse_2_4": 0.01}


def _random_llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, ctx: int, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=ctx, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device(device):  # initialised where it runs: fast for a large model
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def _compressed(model, backend: str):
    """Compress every Linear of the blocks onto the format the backend's kernel stores."""
    from compress_order.stages.magnitude import Magnitude
    from compress_order.stages.rtn import RTN
    from compress_order.modeling.targets import find_targets

    targets = find_targets(model, ["lm_head"])
    stage = {
        "sparse_2_4": Magnitude(0.5, nm="2:4", name="m"),
        "int8_weight_only": RTN(8, -1, True, name="r8"),
        "int4_weight_only": RTN(4, 64, False, name="r4"),
    }[backend]
    for t in targets.values():
        stage.compress(t)
    return targets


def _measure_backend(b, shape: dict, batch: int, seq: int, new: int, dev) -> tuple[list, list, list[str]]:
    """Logits error and dense vs packed timings of one backend on a freshly built and compressed model."""
    import torch

    from compress_order.evaluation.measure import decode_ms_per_token, time_call

    model = _random_llama(**shape, vocab=512, ctx=1024, dtype=torch.float32, device=dev)
    targets = _compressed(model, b.name)
    why = b.fits(targets)
    if why:
        return [], [], [f"{b.name}: {why}"]
    packed = b.convert(model, targets, dev)
    act = next(p.dtype for p in packed.parameters() if p.is_floating_point())
    act_name = str(act).replace("torch.", "")
    x = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits.float()
        out = packed(input_ids=x, use_cache=False).logits.float()
    err = float((out - ref).norm() / ref.norm())
    failures = [] if err <= KERNEL_TOL[b.name] else [f"{b.name}: logits off by {err:.3g} > {KERNEL_TOL[b.name]}"]
    dense = model.to(act)  # the same weights, dense, in the packed model's activation dtype
    with torch.no_grad():
        t_dense = time_call(lambda: dense(input_ids=x, use_cache=False), dev, 2, 10)[0]
        t_packed = time_call(lambda: packed(input_ids=x, use_cache=False), dev, 2, 10)[0]
        d_dense = decode_ms_per_token(dense, x[:1, : seq // 2], new, dev, 1, 3)
        d_packed = decode_ms_per_token(packed, x[:1, : seq // 2], new, dev, 1, 3)
    speed = [b.name, act_name, t_dense, t_packed, t_dense / t_packed, d_dense, d_packed, d_dense / d_packed]
    return [[b.name, act_name, err, KERNEL_TOL[b.name]]], [speed], failures


def packed_backends() -> dict:
    """Each packed backend's logits against the evaluated (dense-simulated) model, and dense vs packed speed in the
    same activation dtype, prefill and decode."""
    import torch

    from compress_order.evaluation.backends import select_backends

    dev = torch.device(DEVICE)
    backends = select_backends("auto", dev)
    shape = dict(hidden=256, inter=512, layers=2, heads=4, kv=4) if SMALL else \
        dict(hidden=2048, inter=5632, layers=8, heads=32, kv=4)  # fmt: skip
    batch, seq, new = (1, 64, 4) if SMALL else (4, 512, 32)
    acc_rows, speed_rows, failures = [], [], []
    for b in backends:
        try:  # one backend without a working kernel is a failure of its own; the others are still measured
            acc, speed, why = _measure_backend(b, shape, batch, seq, new, dev)
        except Exception as e:  # noqa: BLE001  (recorded in the report, with the log's traceback)
            failures.append(_failure(b.name, e))
            continue
        acc_rows += acc
        speed_rows += speed
        progress({"logits": _table(["backend", "activations", "rel error", "tolerance"], acc_rows)})
        failures += why
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    n = sum(
        p.numel() for p in _random_llama(**shape, vocab=512, ctx=1024, dtype=torch.float32, device="meta").parameters()
    )
    figures = {
        "model": f"random LLaMA, {n / 1e6:.0f}M parameters, {shape}; prefill batch {batch} x {seq} tokens, "
                 f"decode {new} tokens after a {seq // 2}-token prompt",
        "logits": _table(["backend", "activations", "rel error", "tolerance"], acc_rows),
        "speed": _table(["backend", "activations", "prefill dense ms", "prefill packed ms", "prefill speed-up",
                         "decode dense ms/tok", "decode packed ms/tok", "decode speed-up"], speed_rows),
    }  # fmt: skip
    if not backends:
        raise Failed(f"no backend runs on {DEVICE}", figures)
    if failures:
        raise Failed("; ".join(failures), figures)
    return figures


# --- 6 ----------------------------------------------------------------------------------------------------------


def large_model() -> dict:
    """A random-initialised LLaMA of ~1B parameters (TinyLlama's shape, the char vocabulary): one GPTQ node, one
    SparseGPT node and a 32-window evaluation, each timed, with tokens/s and peak device memory."""
    import torch

    from compress_order.stages.calibration import calibrate_and_compress
    from compress_order.config.compose import compose_config
    from compress_order.core.instantiate import build
    from compress_order.loaders.models import LoadedModel
    from compress_order.config.settings import run_settings
    from compress_order.config.stages import build_stage
    from compress_order.modeling.targets import ModelState, find_targets
    from compress_order.evaluation.tasks import build_task

    dev = torch.device(DEVICE)
    seqlen, windows, nsamples = (128, 4, 4) if SMALL else (2048, 32, 32)
    cfg = compose_config([f"device={DEVICE}", "stages=[gptq,sparsegpt]", "bits=4", "sparsity=0.5",
                          f"eval.seqlen={seqlen}", f"eval.max_windows={windows}", f"calibration.nsamples={nsamples}",
                          "eval.batch_size=4"])  # fmt: skip
    settings = run_settings(cfg)  # the edge: checked and typed, the device resolved
    charllama = build(settings.model.node())  # its tokenizer and data; the model is replaced
    shape = dict(hidden=256, inter=768, layers=2, heads=4, kv=2) if SMALL else \
        dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4)  # fmt: skip
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = _random_llama(**shape, vocab=len(charllama.tokenizer), ctx=seqlen, dtype=dtype, device=dev)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    lm = LoadedModel(model=model, kind="causal_lm", name="llama-random", skip=["lm_head"],
                     tokenizer=charllama.tokenizer, seqlen=seqlen)  # fmt: skip
    task = build_task(lm, build(settings.data.node()), settings)
    targets = find_targets(model, lm.skip)
    state = ModelState(model, targets)
    dense = state.snapshot()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        return out, time.perf_counter() - t, peak

    rows = []
    eval_tokens = windows * seqlen
    cal_tokens = nsamples * seqlen
    (m, _), s, peak = timed(lambda: task.evaluate(model))
    rows.append(["dense", "evaluate", s, eval_tokens / s, peak, m["perplexity"]])
    header = ["node", "step", "seconds", "tokens/s", "peak GiB", "perplexity"]
    progress({"timings": _table(header, rows)})
    for sc in settings.stages:
        state.restore(dense)
        stage = build_stage(sc)
        stage.validate(targets)
        _, s, peak = timed(lambda st=stage: calibrate_and_compress(model, targets, task.calibration_batches(), st,
                                                                   settings.calibration))  # fmt: skip
        state.check()
        rows.append([sc.label, "calibrate + compress", s, cal_tokens / s, peak, float("nan")])
        progress({"timings": _table(header, rows)})
        (m, _), s, peak = timed(lambda: task.evaluate(model))
        rows.append([sc.label, "evaluate", s, eval_tokens / s, peak, m["perplexity"]])
        progress({"timings": _table(header, rows)})
    figures = {
        "model": f"random LLaMA, {params / 1e6:,.0f}M parameters ({shape}, {str(dtype).replace('torch.', '')}), "
                 f"built on {DEVICE} in {build_s:.1f} s",
        "work": f"calibration {nsamples} x {seqlen} tokens; evaluation {windows} windows x {seqlen} tokens",
        "timings": _table(header, rows),
    }  # fmt: skip
    bad = [r[0] for r in rows if r[1] == "evaluate" and not math.isfinite(r[5])]
    if bad:
        raise Failed(f"non-finite perplexity at {', '.join(bad)}", figures)
    return figures


# --- 7 ----------------------------------------------------------------------------------------------------------

FLOAT_TOL = {"fp8 _scaled_mm": 0.01, "torchao float8": 0.08, "torchao mxfp4": 0.3, "torchao nvfp4": 0.2}
# _scaled_mm against the same FP8 product computed densely: bf16 output rounding (2^-8) only. The torchao paths
# against the evaluated weights with 16-bit activations: they quantize the activations too (E4M3: about 4%;
# E2M1 with its group scale: tens of percent), so their bound is loose: it catches a wrong layout, not a drift.


def _needs(dev, sm: tuple[int, int]) -> str | None:
    """Why a CUDA path needing compute capability `sm` cannot run here (None: it can)."""
    import torch

    if dev.type != "cuda":
        return "CUDA only"
    have = torch.cuda.get_device_capability(dev)
    return None if have >= sm else f"needs SM {sm[0]}.{sm[1]}+, this GPU is SM {have[0]}.{have[1]}"


def _fp8_scaled_mm(w, x, dev) -> tuple[list, list]:
    """torch._scaled_mm on the node's own FP8 codes and per-channel float32 scales (rowwise scaling), activations
    quantized per row to E4M3 (amax / 448), against the same product computed densely in float32."""
    import torch

    from compress_order.numerics.formats import codebook, fit_float_grid
    from compress_order.evaluation.measure import time_call

    grid = fit_float_grid(w, "fp8", -1)
    wq = grid.project(w)  # the weights as a stage leaves them (float32)
    w8 = codebook(8, dev)[grid.codes(wq).long()].to(torch.float8_e4m3fn)  # their own codes, stored as FP8
    sw = grid.scale.reshape(1, -1).contiguous()  # (1, out): one float32 scale per output channel
    held = int((w8.float() * grid.scale != wq).sum())

    def quantized_x() -> tuple:
        sx = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
        return (x.float() / sx).to(torch.float8_e4m3fn), sx

    def packed():
        xq, sx = quantized_x()
        return torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

    xq, sx = quantized_x()
    ref = (xq.float() * sx) @ wq.t()
    err = float((packed().float() - ref).norm() / ref.norm())
    wb = wq.to(torch.bfloat16)
    t_dense = time_call(lambda: x @ wb.t(), dev, 3, 20)[0]
    t_packed = time_call(packed, dev, 3, 20)[0]
    return [["fp8 _scaled_mm", "FP8 rowwise", held, err, FLOAT_TOL["fp8 _scaled_mm"]]], \
        [["fp8 _scaled_mm", t_dense, t_packed, t_dense / t_packed]]  # fmt: skip


def _torchao_path(name: str, w, x, dev) -> tuple[list, list]:
    """One of torchao's float inference configs on a Linear holding weights already on our grid of that format
    (bf16: FP4 values with their power-of-two or E4M3 scales fit it), then: how many weights its tensor does not
    hold as ours, its output against the evaluated weights' bf16 product, and its time against that product."""
    import torch

    from compress_order.numerics.formats import fit_float_grid
    from compress_order.evaluation.measure import time_call
    from torchao.quantization import quantize_

    fmt = name.split()[-1]
    wb = w.to(torch.bfloat16)
    if fmt == "float8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        wq = fit_float_grid(wb, "fp8", -1).project(wb)
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    elif fmt == "mxfp4":
        from torchao.prototype.mx_formats.inference_workflow import MXDynamicActivationMXWeightConfig
        from torchao.prototype.mx_formats.config import ScaleCalculationMode

        wq = fit_float_grid(wb, "mxfp4", 32).project(wb)
        fp4 = torch.float4_e2m1fn_x2  # OCP MX: the scale is 2^(floor(log2 amax) - 2), as our grid's
        config = MXDynamicActivationMXWeightConfig(activation_dtype=fp4, weight_dtype=fp4,
                                                   scaling_mode=ScaleCalculationMode.FLOOR)  # fmt: skip
    else:
        from torchao.prototype.mx_formats.inference_workflow import NVFP4DynamicActivationNVFP4WeightConfig

        wq = fit_float_grid(wb, "nvfp4", 16).project(wb)
        config = NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False)
    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev, dtype=torch.bfloat16))
    model[0].weight.data.copy_(wq)
    quantize_(model, config)  # inside a container: a transform may replace the Linear
    lin = model[0]
    with torch.no_grad():
        held = int((lin.weight.dequantize(torch.bfloat16) != wq).sum())
        ref = x.float() @ wq.float().t()
        err = float((lin(x).float() - ref).norm() / ref.norm())
        t_dense = time_call(lambda: x @ wq.t(), dev, 3, 20)[0]
        t_packed = time_call(lambda: lin(x), dev, 3, 20)[0]
    return [[name, type(lin.weight).__name__, held, err, FLOAT_TOL[name]]], [[name, t_dense, t_packed,
                                                                           t_dense / t_packed]]  # fmt: skip


def float_kernels() -> dict:
    """The float formats' matmuls on weights rounded onto our own grids (compress_order/numerics/formats.py): torch._scaled_mm
    with FP8 rowwise scales (CUDA SM 8.9+; torch 2.14 also has it on CPU), torchao's Float8Tensor with dynamic FP8
    activations (SM 8.9+), and torchao's MXFP4 and NVFP4 tensors (SM 10.0+). For each: the weights its tensor does
    not hold as ours, its output error, its time against the dense bf16 matmul. A path this GPU cannot take is a
    row saying why; on CUDA, none taking any is a skip, one off by more than its tolerance a failure."""
    import torch

    dev = torch.device(DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Skipped("torch sees no CUDA device")
    m, k, n = (64, 256, 256) if SMALL else (2048, 4096, 4096)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dev)
    x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
    needs = {"fp8 _scaled_mm": None if dev.type == "cpu" else (8, 9), "torchao float8": (8, 9),
             "torchao mxfp4": (10, 0), "torchao nvfp4": (10, 0)}  # fmt: skip
    paths = {name: (sm, (lambda: _fp8_scaled_mm(w, x, dev)) if name == "fp8 _scaled_mm" else
                    (lambda name=name: _torchao_path(name, w, x, dev))) for name, sm in needs.items()}  # fmt: skip
    acc, speed, not_run, failures = [], [], [], []
    for name, (sm, fn) in paths.items():
        why = _needs(dev, sm) if sm is not None else None
        if why:
            not_run.append([name, why])
            continue
        try:
            a, s = fn()
        except Exception as e:  # noqa: BLE001  (recorded in the report, with the log's traceback)
            failures.append(_failure(name, e))
            continue
        acc += a
        speed += s
        if a[0][3] > a[0][4]:
            failures.append(f"{name}: output off by {a[0][3]:.3g} > {a[0][4]}")
        progress({"accuracy": _table(["path", "weight tensor", "weights not held", "rel error", "tolerance"], acc)})
    figures = {
        "shape": f"x ({m}, {k}) bf16 @ w ({n}, {k})ᵀ, w ~ N(0, 0.02²) rounded onto each format's grid",
        "accuracy": _table(["path", "weight tensor", "weights not held", "rel error", "tolerance"], acc),
        "speed": _table(["path", "dense bf16 ms", "packed ms", "speed-up"], speed),
        "not run": _table(["path", "why"], not_run),
    }  # fmt: skip
    if failures:
        raise Failed("; ".join(failures), figures)
    if not acc:
        raise Skipped(f"no float kernel runs here: {'; '.join(f'{p}: {w}' for p, w in not_run)}")
    return figures


CHECKS: dict[str, Callable[[], dict]] = {
    f.__name__: f for f in (cuda_tests, end_to_end, calibration_device, half_precision, packed_backends, large_model,
                            float_kernels)
}


def main(argv: list[str] | None = None) -> int:
    global DEVICE, SMALL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(CHECKS))
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the plumbing")
    ap.add_argument("--small", action="store_true", help="small models (with --device cpu)")
    args = ap.parse_args(argv)
    DEVICE, SMALL = args.device, args.small
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        result = {"status": "passed", "reason": "", "figures": CHECKS[args.name]()}
    except Failed as e:
        result = {"status": "failed", "reason": str(e.args[0]), "figures": e.args[1] if len(e.args) > 1 else {}}
    except Skipped as e:
        result = {"status": "skipped", "reason": str(e), "figures": {}}
    text = json.dumps(result, indent=1, default=str)
    dest = os.environ.get("GPU_CHECK_RESULT")
    if dest:
        Path(dest).write_text(text)
    print(text)
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
