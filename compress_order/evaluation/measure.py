"""What a compressed model costs: sparsity, packed bits and bytes, and forward latency."""

from __future__ import annotations

import inspect
import math
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

from compress_order.modeling.coverage import compressed_share
from compress_order.modeling.targets import Target
from compress_order.numerics.constraints import nonzero_count


def layer_bits(t: Target, dense_bits: int = 16, kept: int | None = None) -> tuple[float, str]:
    """Bits of one layer in its packed form, and the format used.

    Values take `bits` each when quantized, else `dense_bits`. A quantized layer adds a 16-bit scale per
    (row, group) and, when asymmetric, a `bits`-wide zero-point. A pruned layer stores only kept values plus
    its index metadata: ceil(log2 M) bits per kept value for N:M, a 1-bit-per-weight bitmask otherwise
    (or plain dense storage, when that is smaller). `kept`: the mask's kept weights, when already counted.
    """
    rows, cols = t.shape
    numel = rows * cols
    c = t.constraint
    if c.dropped:  # a removed expert is not stored at all
        return 0.0, "removed"
    vbits = c.grid.bits if c.grid is not None else dense_bits
    overhead = 0.0
    if c.grid is not None:
        overhead = c.grid.scale_bits()
    if c.packed_mask is None:
        return numel * vbits + overhead, "dense"
    kept = int(c.kept()) if kept is None else kept  # type: ignore[arg-type]
    if c.nm is not None:
        return kept * (vbits + math.ceil(math.log2(c.nm[1]))) + overhead, f"{c.nm[0]}:{c.nm[1]}"
    bitmask = kept * vbits + numel
    dense = numel * vbits
    return (bitmask + overhead, "bitmask") if bitmask < dense else (dense + overhead, "dense")


def _counts(targets: dict[str, Target]) -> dict[str, tuple[int, int]]:
    """Each target's non-zero weights and kept weights (its mask's, else all), counted where they live and read
    back with one host sync per device, not one per layer (non-zeros by their bits: constraints.nonzero_count)."""
    queued: dict[torch.device, list[tuple[str, int, Tensor]]] = {}
    out: dict[str, list[int]] = {}
    for name, t in targets.items():
        w, kept = t.weight, t.constraint.kept()
        out[name] = [0, w.numel()]
        queued.setdefault(w.device, []).append((name, 0, nonzero_count(w)))
        if kept is not None:
            queued.setdefault(kept.device, []).append((name, 1, kept))
    for entries in queued.values():
        for (name, i, _), value in zip(entries, torch.stack([e[2] for e in entries]).tolist()):
            out[name][i] = value
    return {name: (nonzero, kept) for name, (nonzero, kept) in out.items()}


@torch.no_grad()
def compression_metrics(model: nn.Module, targets: dict[str, Target], dense_bits: int = 16) -> dict[str, float]:
    target_params = {id(t.parameter) for t in targets.values()}
    counts = _counts(targets)
    numel = zeros = 0
    bits = 0.0
    kept: dict[str, int] = {}
    for name, t in targets.items():
        rows, cols = t.shape
        nonzero, kept[name] = counts[name]
        numel += rows * cols
        zeros += rows * cols - nonzero
        bits += layer_bits(t, dense_bits, kept[name])[0]
    rest = sum(p.numel() for p in model.parameters() if id(p) not in target_params)
    return {
        "sparsity": zeros / numel,
        "avg_bits": bits / numel,
        "size_bytes": (bits + rest * dense_bits) / 8,
        "coverage": compressed_share(targets, kept),
    }


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10
) -> tuple[float, float]:
    """Median and inter-quartile range (ms) of `fn()`; CUDA is synchronised around every call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


@torch.no_grad()
def decode_ms_per_token(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device, warmup: int = 1, repeats: int = 5
) -> float:
    """Median ms per generated token with a KV cache: prefill the prompt (untimed), then time greedy steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # transformers 5 renamed the KV cache argument and output field to `cache` (the old name is deprecated).
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    times = []
    for i in range(warmup + repeats):
        out = model(input_ids=prompt, use_cache=True)
        past, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, use_cache=True, **{key: past})
            past, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3 / new_tokens)
    return statistics.median(times)


# Peak memory of one trie node (its stage application and evaluation). Cheap: no tracing, only high-water marks
# that the allocator (CUDA) or the kernel (CPU) keeps anyway, reset where the node's work starts.
_CLEAR_REFS, _STATUS = "/proc/self/clear_refs", "/proc/self/status"


def shape_signature(model: nn.Module, targets: dict[str, Target]) -> tuple:
    """What a dense forward's time depends on: every parameter's name, shape and dtype, the layers removed
    from the computation (dropped experts), and the layers whose input is rotated at run time. Two nodes alike in these run the same kernels on the same shapes,
    whatever their weights' values."""
    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())
    online = tuple(n for n, m in model.named_modules() if getattr(m, "online_rotation", False))  # extra matmuls
    return params, tuple(sorted(n for n, t in targets.items() if t.constraint.dropped)), online


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or (Linux) the process's peak resident set (VmHWM), which
    writing 5 to /proc/self/clear_refs resets. Elsewhere the CPU peak stays the process's peak so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """MB at the high-water mark since `reset_peak`: tensors allocated on a CUDA device, else the whole process's
    resident memory (model, data, snapshots and libraries), from VmHWM or else ru_maxrss (peak since start)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux
