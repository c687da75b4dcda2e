"""`save=true`: each full order's compressed model as a Hugging Face checkpoint, with its per-layer constraints.

<run dir>/models/<order slug>/ holds a checkpoint in one of two formats:

  compressed-tensors  (the default for a node with a quantizer) what serving stacks load: config.json carries a
                      compressed-tensors `quantization_config` (format pack-quantized, one config group per scheme,
                      dense layers in `ignore`) and each quantized Linear its packed integer codes, scales and
                      zero-points, taken from the node's own grids (compress_order/ct_export.py). Pruned weights are
                      zero codes.
  dense               (the default for a node without one) what `save_pretrained` writes: the weights as evaluated,
                      pruned weights exact zeros, quantized weights exactly on their grids, in the model's dtype.

Both come with the tokenizer and a sidecar that loaders ignore:

  compression.json          order, model, checkpoint format, the weight files' bytes on disk beside the computed
                            `size_bytes` (and for compressed-tensors: whether reloading gives
                            the evaluated weights bit for bit, and whether vLLM's WNA16 path serves it, or why not),
                            and per layer: shape, stages applied, measured sparsity and structure (dense, unstructured
                            or N:M), mask density, quantization bits, group size, symmetry; tensor entries name keys
                            of ↓. Masks and codes index `shape`, the (out, in·kh·kw) view; `layout` and
                            `stored_shape` say how it maps onto the tensor in the checkpoint: (out, in) is the view,
                            (out, in/groups, kh, kw) (Conv2d) is it reshaped row-major, (in, out) (transformers'
                            Conv1D, GPT-2) is its transpose: mask[r, c] belongs to stored[c, r]
  compression.safetensors   per layer `<layer>.mask` (np.packbits of the row-major keep-mask, True = kept),
                            `<layer>.scale` (float32) and `<layer>.zero` (uint8 integer zero-points), (rows, groups)

A quantized weight w[r, c] = (code - zero[r, g]) * scale[r, g] with g = c // group_size, code in [0, 2^bits - 1].
`AutoModelForCausalLM.from_pretrained(dir)` reloads the compressed model as it was evaluated: a dense checkpoint
always, a compressed-tensors one when its grids are symmetric (`transformers_reload` in the sidecar; see
compress_order/ct_export.py), in float32 bit for bit (`exact`).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from compress_order.errors import UserError
from compress_order.models import LoadedModel
from compress_order.targets import Target, adapter_for
from compress_order.trie import Node

MODELS_DIR = "models"
FORMAT = "compress-order/compression-v1"
log = logging.getLogger(__name__)


def order_slug(order: tuple[str, ...]) -> str:
    """A folder name for an order: 'magnitude > rtn' → 'magnitude_then_rtn'."""
    return "_then_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", lab).strip("-") or "stage" for lab in order)


SAVE_FORMATS = ("auto", "compressed-tensors", "dense")


def checkpoint_format(targets: dict[str, Target], fmt: str = "auto") -> str:
    """`auto`: compressed-tensors when the node holds a quantizer whose grids are all symmetric; dense otherwise —
    nothing to pack, or zero-points, which compressed-tensors 0.20 writes (vLLM serves them) but transformers cannot
    load back, so a dense checkpoint is what reloads with `model.path=` (ask for compressed-tensors to get one)."""
    if fmt not in SAVE_FORMATS:
        raise UserError(f"save format '{fmt}' is unknown; valid: {', '.join(SAVE_FORMATS)}")
    if fmt == "auto":
        grids = [t.constraint.grid for t in targets.values() if t.constraint.grid is not None]
        return "compressed-tensors" if grids and all(g.sym for g in grids) else "dense"
    return fmt


def save_node(lm: LoadedModel, targets: dict[str, Target], node: Node, full_depth: int, out_dir: Path,
              fmt: str = "auto", dense_bits: int = 16) -> Path | None:  # fmt: skip
    """Called for every visited node when `save=true`, with the node's weights in the model: checks at the dense
    node that the model can be saved (before any compression work) and writes every full order."""
    if node.depth == 0:
        if not hasattr(lm.model, "save_pretrained"):
            raise UserError(f"save=true needs a Hugging Face model (save_pretrained); model '{lm.name}' has none")
        checkpoint_format(targets, fmt)
    if node.depth != full_depth or node.depth == 0:
        return None
    return save_model(lm, targets, node.order, Path(out_dir) / MODELS_DIR / order_slug(node.order), fmt, dense_bits)


def save_model(lm: LoadedModel, targets: dict[str, Target], order: tuple[str, ...], dest: Path,
               fmt: str = "auto", dense_bits: int = 16) -> Path:  # fmt: skip
    """Write the model, tokenizer and sidecar into `dest`, replacing it whole (written beside, renamed). The
    sidecar's checkpoint entry records the weight files' bytes on disk beside the computed `size_bytes` (at
    `dense_bits` per uncompressed weight, as the run's metric)."""
    from compress_order.measure import compression_metrics

    fmt = checkpoint_format(targets, fmt)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        record, tensors = constraint_record(targets)
        with _as_plain_model(lm.model):
            if fmt == "compressed-tensors":
                checkpoint = save_compressed_tensors(lm.model, targets, tmp)
            else:
                lm.model.save_pretrained(tmp)
                checkpoint = {"format": "dense"}
        checkpoint.update(disk_bytes=weight_bytes(tmp), dense_bits=dense_bits,
                          size_bytes=compression_metrics(lm.model, targets, dense_bits)["size_bytes"])  # fmt: skip
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        record = {"format": FORMAT, "model": lm.name, "order": list(order), "label": " > ".join(order),
                  "checkpoint": checkpoint, **record}  # fmt: skip
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / "compression.safetensors"))
        (tmp / "compression.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while saving {dest}; free space or set hydra.run.dir elsewhere") from None
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"cannot write {dest} ({e.strerror}); choose a writable hydra.run.dir") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s (%s)", dest, summary_line(checkpoint))
    return dest


def save_compressed_tensors(model: torch.nn.Module, targets: dict[str, Target], save_dir: Path) -> dict[str, Any]:
    """A compressed-tensors pack-quantized checkpoint of the model as it is; returns what the sidecar records."""
    from compress_order import ct_export

    packed = {n: ct_export.pack_layer(t) for n, t in targets.items() if t.constraint.grid is not None}
    schemes = {n: p.scheme for n, p in packed.items()}
    config = ct_export.quantization_config(schemes, ignore=ct_export.dense_linears(model, set(packed)))
    model.save_pretrained(save_dir, state_dict=ct_export.compressed_state_dict(model, packed))
    ct_export.write_config(str(save_dir), config)
    servable, reasons = ct_export.vllm_servability(model, schemes)
    mismatched = sum(p.mismatched for p in packed.values())
    return {
        "format": "compressed-tensors", "compression_format": ct_export.FORMAT,
        "schemes": sorted({p.scheme.describe() for p in packed.values()}),
        "exact": mismatched == 0,  # reloading gives the evaluated weights bit for bit
        "mismatched_weights": mismatched,  # otherwise: weights changed by holding scales in the model dtype
        "vllm_wna16": {"servable": servable, "reasons": reasons},
        "transformers_reload": ct_export.transformers_reloads(schemes),
    }  # fmt: skip


def weight_bytes(folder: Path) -> int:
    """Bytes on disk of a checkpoint's weight files (safetensors shards or .bin), not its config or tokenizer."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in (".safetensors", ".bin")
               and f.name != "compression.safetensors")  # fmt: skip


def summary_line(checkpoint: dict[str, Any]) -> str:
    """What a saved checkpoint is, in one line: its format, its bytes on disk beside the computed size and, for
    compressed-tensors, exactness and servability."""
    size = ""
    if "disk_bytes" in checkpoint:
        size = (f"; {checkpoint['disk_bytes']:,} bytes on disk, size_bytes {checkpoint['size_bytes']:,.0f} "
                f"({checkpoint['dense_bits']}-bit dense layers)")  # fmt: skip
    if checkpoint["format"] != "compressed-tensors":
        return f"{checkpoint['format']} checkpoint{size}"
    exact = "exact" if checkpoint["exact"] else f"{checkpoint['mismatched_weights']} weights not exact"
    vllm = checkpoint["vllm_wna16"]
    serve = "vLLM WNA16 serves it" if vllm["servable"] else f"vLLM WNA16 does not serve it: {'; '.join(vllm['reasons'])}"
    reload = "" if checkpoint["transformers_reload"] else "; transformers cannot reload its zero-points"
    return (f"compressed-tensors {checkpoint['compression_format']}, {', '.join(checkpoint['schemes'])}; {exact}; "
            f"{serve}{reload}{size}")  # fmt: skip


@contextmanager
def _as_plain_model(model: torch.nn.Module) -> Iterator[None]:
    """A model read from a GGUF file keeps transformers' GGUF quantizer, which refuses to save. Once its weights are
    dequantized into ordinary layers (compress-order compresses those), it is an ordinary model: save it as one."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        yield
        return
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise UserError(f"save=true: the GGUF weights are still packed ({', '.join(packed)}); cannot save them")
    attrs = {k: getattr(model, k) for k in ("hf_quantizer", "is_quantized", "quantization_method") if hasattr(model, k)}
    qc = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    try:
        yield
    finally:
        for k, v in attrs.items():
            setattr(model, k, v)
        if qc is not None:
            model.config.quantization_config = qc


@torch.no_grad()
def constraint_record(targets: dict[str, Target]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Per-layer constraints as JSON-ready scalars, and their tensors (masks, scales, zeros) by key."""
    layers: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in targets.items():
        c, w = t.constraint, t.weight
        entry: dict[str, Any] = {
            "shape": list(w.shape),  # the weight as every stage sees it: (out, in·kh·kw)
            "kind": type(t.module).__name__,
            "layout": adapter_for(t.module).layout,  # the stored tensor's axes in terms of `shape`
            "stored_shape": list(t.module.weight.shape),
            "applied": list(c.applied),
            "sparsity": float((w == 0).float().mean()),  # measured on the saved weight
            "density": 1.0,
            "min_sparsity": float(c.min_sparsity),
            "nm": list(c.nm) if c.nm else None,
            "structure": f"{c.nm[0]}:{c.nm[1]}" if c.nm else ("dense" if c.mask is None else "unstructured"),
            "mask": None,
            "quant": None,
        }
        if c.mask is not None:
            entry["density"] = float(c.mask.float().mean())
            entry["mask"] = f"{name}.mask"
            tensors[entry["mask"]] = torch.from_numpy(np.packbits(c.mask.cpu().numpy().reshape(-1)))
        if c.grid is not None:
            g = c.grid
            entry["quant"] = {
                "bits": g.bits, "group_size": g.group_size, "sym": g.sym, "n_groups": g.n_groups,
                "scale": f"{name}.scale", "zero": f"{name}.zero",
            }  # fmt: skip
            tensors[f"{name}.scale"] = g.scale.detach().float().cpu().contiguous()
            tensors[f"{name}.zero"] = g.zero.detach().cpu().to(torch.uint8).contiguous()  # integers in [0, 2^bits-1]
        layers[name] = entry
    zeros = sum(int((t.weight == 0).sum()) for t in targets.values())
    total = sum(t.weight.numel() for t in targets.values())
    return {"weights_dtype": _dtype(targets), "sparsity": zeros / total, "layers": layers}, tensors


def _dtype(targets: dict[str, Target]) -> str:
    return str(next(iter(targets.values())).module.weight.dtype).removeprefix("torch.")


def load_constraints(model_dir: str | Path) -> dict[str, Any]:
    """compression.json with its tensors filled in: masks as bool (rows, cols), scales and zeros as float32."""
    d = Path(model_dir)
    record = json.loads((d / "compression.json").read_text(encoding="utf-8"))
    side = d / "compression.safetensors"
    if side.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(side))
        for entry in record["layers"].values():
            if entry["mask"]:
                rows, cols = entry["shape"]
                bits = np.unpackbits(tensors[entry["mask"]].numpy(), count=rows * cols)
                entry["mask"] = torch.from_numpy(bits.astype(bool).reshape(rows, cols))
            if entry["quant"]:
                q = entry["quant"]
                q["scale"], q["zero"] = tensors[q["scale"]], tensors[q["zero"]].float()
    return record


def export_command(args: list[str]) -> int:
    """`compress-order export RUN_DIR --order "a > b" [--format ...] [--seed N]`: rebuild one full order of a finished
    run from its saved config (the same stages, settings and calibration seed: `--seed`, one of the run's seeds,
    default its first) and write it to RUN_DIR/models/<order>/."""
    import argparse
    from typing import NoReturn

    def error(message: str) -> NoReturn:
        raise UserError(f"export: {message}; usage: export RUN_DIR --order \"a > b\" [--format FORMAT] [--seed N]")

    parser = argparse.ArgumentParser(prog="compress-order export", exit_on_error=False)
    parser.error = error  # type: ignore[method-assign]  (one line instead of argparse's usage and exit)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--order", required=True, help='a full order of the run, e.g. "magnitude > rtn"')
    parser.add_argument("--format", default="auto", dest="fmt", help=f"one of: {', '.join(SAVE_FORMATS)}")
    parser.add_argument("--seed", type=int, help="the calibration seed to rebuild (default: the run's first)")
    try:
        ns, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as e:
        error(str(e))
    if unknown:
        error(f"unexpected argument(s) {' '.join(unknown)}")
    checkpoint_format({}, ns.fmt)  # the format's name, before any model is loaded
    dest = export_order(ns.run_dir, tuple(s.strip() for s in ns.order.split(">")), ns.fmt, ns.seed)
    record = json.loads((dest / "compression.json").read_text(encoding="utf-8"))
    print(f"{dest}: {summary_line(record['checkpoint'])}")
    return 0


def export_order(run_dir: Path, order: tuple[str, ...], fmt: str = "auto", seed: int | None = None) -> Path:
    """Apply the stages of `order` to the run's dense model as the run did for calibration seed `seed` (default:
    the run's first), check every invariant, and save."""
    from omegaconf import OmegaConf

    import compress_order.config  # noqa: F401  (registers ${asset:}, which the embedded models' saved configs use)
    from compress_order.instantiate import build
    from compress_order.plan import run_seeds, with_seed
    from compress_order.runner import apply_stage
    from compress_order.stages import build_stage, stage_configs
    from compress_order.tasks import build_task
    from compress_order.targets import ModelState, find_targets
    from compress_order.trie import build_trie, full_orders
    from compress_order.validate import resolve_device

    saved = Path(run_dir) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir} has no .hydra/config.yaml; expected the folder of a `compress-order run`")
    cfg = OmegaConf.load(saved)
    staged, joint = stage_configs(cfg), stage_configs(cfg, key="joint")
    by_label = {sc["label"]: sc for sc in staged + joint}
    full = {n.order for n in full_orders(build_trie([sc["label"] for sc in staged], [sc["label"] for sc in joint]))}
    if order not in full:
        valid = "; ".join(sorted(" > ".join(o) for o in full))
        raise UserError(f"order '{' > '.join(order)}' is not a full order of this run; valid: {valid}")
    seeds = run_seeds(cfg)
    if seed is not None and seed not in seeds:
        raise UserError(f"seed {seed} is not a calibration seed of this run; valid: {', '.join(map(str, seeds))}")
    cfg = with_seed(cfg, seeds[0] if seed is None else seed)
    device = resolve_device(str(cfg.device))
    cfg.device = str(device)
    lm = build(cfg.model)
    if not hasattr(lm.model, "save_pretrained"):
        raise UserError(f"export needs a Hugging Face model (save_pretrained); model '{lm.name}' has none")
    lm.model.to(device)
    targets = find_targets(lm.model, lm.skip)
    state = ModelState(lm.model, targets)
    stages = {lab: build_stage(by_label[lab]) for lab in order}
    for s in stages.values():
        s.validate(targets)
    task = build_task(lm, build(cfg.data), cfg)
    torch.manual_seed(int(cfg.seed))
    for lab in order:
        why = apply_stage(stages[lab], state, task, cfg)
        if why is not None:
            raise UserError(f"order '{' > '.join(order)}' is infeasible ({why}); nothing to export")
    return save_model(lm, targets, order, Path(run_dir) / MODELS_DIR / order_slug(order), fmt, int(cfg.dense_bits))
