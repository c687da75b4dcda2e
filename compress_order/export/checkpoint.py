"""`save=true`: each full order's compressed model as a Hugging Face checkpoint, with its per-layer constraints.

<run dir>/models/<order slug>/ (a run with several calibration seeds: <order slug>/seed-<N>/, one per seed) holds a
checkpoint in one of two formats:

  compressed-tensors  (the default for a node with a quantizer, all its grids symmetric) what serving stacks load:
                      config.json carries a compressed-tensors `quantization_config` (format pack-quantized, one
                      config group per scheme, dense layers in `ignore`) and each quantized Linear its packed integer
                      codes, scales and zero-points, taken from the node's own grids (compress_order/export/compressed_tensors.py).
                      Pruned weights are zero codes. A run with `act_bits` writes `int-quantized` (one int8 per code)
                      with each group's input-activation scheme. Float grids: float-quantized (FP8),
                      nvfp4-pack-quantized, mxfp4-pack-quantized, from their own codes and scales.
  dense               (the default otherwise) what `save_pretrained` writes: the weights as evaluated,
                      pruned weights exact zeros, quantized weights exactly on their grids, in the model's dtype.

Both come with the tokenizer and a sidecar that loaders ignore:

  compression.json          order, model, checkpoint format, the weight files' bytes on disk beside the computed
                            `size_bytes` (and for compressed-tensors: whether reloading gives
                            the evaluated weights bit for bit, which vLLM path reads it and whether it serves it, or
                            why not, and whether transformers reloads it),
                            and per layer: shape, stages applied, measured sparsity and structure (dense, unstructured
                            or N:M), mask density, quantization bits, group size, symmetry; tensor entries name keys
                            of ↓. Masks and codes index `shape`, the (out, in·kh·kw) view; `layout` and
                            `stored_shape` say how it maps onto the tensor in the checkpoint: (out, in) is the view,
                            (out, in/groups, kh, kw) (Conv2d) is it reshaped row-major, (in, out) (transformers'
                            Conv1D, GPT-2) is its transpose: mask[r, c] belongs to stored[c, r]
  compression.safetensors   per layer `<layer>.mask` (np.packbits of the row-major keep-mask, True = kept),
                            `<layer>.scale` (float32) and `<layer>.zero` (uint8 integer zero-points), (rows, groups)

A quantized weight w[r, c] = (code - zero[r, g]) * scale[r, g] with g = c // group_size, code in [0, 2^bits - 1]
(`format` int); a float grid's (fp8, nvfp4, mxfp4: compress_order/numerics/formats.py) is value · scale[r, g] with value
an E4M3 or E2M1 number, its zeros all 0. compressed-tensors writes float grids as float-quantized (FP8),
nvfp4-pack-quantized and mxfp4-pack-quantized, from their codes (compress_order/export/compressed_tensors.py).
`AutoModelForCausalLM.from_pretrained(dir)` reloads the compressed model as it was evaluated: a dense checkpoint
always, a compressed-tensors one when its grids are symmetric and, for NVFP4 / MXFP4, the model is bfloat16
(`transformers_reload` in the sidecar; see compress_order/export/compressed_tensors.py), bit for bit where `exact` says so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from compress_order.core.errors import UserError
from compress_order.core.files import pid_alive
from compress_order.core.schema import MODELS_DIR, SAVE_FORMATS, SIDECAR, SIDECAR_TENSORS
from compress_order.core.settings import Activations, RunSettings
from compress_order.loaders.models import LoadedModel
from compress_order.modeling.moe import renamed_after_removal, without_removed_experts
from compress_order.modeling.targets import Target, by_current_name

if TYPE_CHECKING:  # ct_export imports compressed-tensors, which a run without save=true does not need
    from compress_order.export.compressed_tensors import ActScheme

FORMAT = "compress-order/compression-v1"
log = logging.getLogger(__name__)


def order_slug(order: tuple[str, ...]) -> str:
    """A folder name for an order: 'magnitude > rtn' → 'magnitude_then_rtn'."""
    # only characters a Hydra override takes unquoted, so the folder can be passed back as model.path=<folder>
    return "_then_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", lab).strip("-") or "stage" for lab in order)


def model_dir(run_dir: Path, order: tuple[str, ...], seed: int | None = None) -> Path:
    """Where an order's model is saved: models/<order>/, or models/<order>/seed-<N>/ when the run has several
    calibration seeds (`seed` given), so that each seed's model is kept."""
    d = Path(run_dir) / MODELS_DIR / order_slug(order)
    return d if seed is None else d / f"seed-{seed}"


def act_scheme(act: Activations | None) -> ActScheme | None:
    """The run's activation scheme (`act_bits`, `act_granularity`, `act_format`) as compressed-tensors writes it,
    or None."""
    from compress_order.export.compressed_tensors import ActScheme

    return None if act is None else ActScheme(act.bits, act.granularity, act.format)


def checkpoint_format(targets: dict[str, Target], fmt: str = "auto") -> str:
    """`auto`: compressed-tensors when the node holds a quantizer whose grids are all symmetric; dense otherwise —
    nothing to pack, or zero-points, which compressed-tensors 0.20 writes (vLLM serves them) but transformers cannot
    load back, so a dense checkpoint is what reloads with `model.path=` (ask for compressed-tensors to get one)."""
    if fmt not in SAVE_FORMATS:
        raise UserError(f"save format '{fmt}' is unknown; valid: {', '.join(SAVE_FORMATS)}")
    grids = [t.constraint.grid for t in targets.values() if t.constraint.grid is not None]
    if fmt == "auto":  # float grids are symmetric: they have no zero-points
        return "compressed-tensors" if grids and all(g.sym for g in grids) else "dense"
    return fmt


def check_packable(fmt: str, order: list[str], kinds: list[str]) -> None:
    """compressed-tensors packs quantization grids: a full order whose stages (`kinds`: each one's Stage.kind)
    quantize nothing has none to pack, so asking for that format is refused before any work (`auto` writes such a
    node dense)."""
    if fmt == "compressed-tensors" and not any(k in ("quantize", "joint") for k in kinds):
        raise UserError(
            f"save_format=compressed-tensors packs quantization grids, and the order {' > '.join(order)} quantizes "
            f"nothing; use save_format=dense (or auto, which writes it dense)"
        )


def save_node(
    lm: LoadedModel,
    targets: dict[str, Target],
    order: tuple[str, ...],
    depth: int,
    full_depth: int,
    out_dir: Path,
    job: RunSettings,
    input_scales: Callable[[], dict[str, torch.Tensor] | None] | None = None,
) -> Path | None:
    """Called for every visited node when `save=true`, with the node's weights in the model: `order` its labels,
    `depth` the stages it stands for (a joint schedule is one label but a full order), `job` the calibration
    seed's settings. Checks at the dense node that the model can be saved (before any compression work) and
    writes every full order (into a folder per seed when the run has several). `input_scales` observes the
    static activation scales of the weights held now; it is called for full orders only (it runs calibration)."""
    fmt = job.save.format
    if depth == 0:
        if not hasattr(lm.model, "save_pretrained"):
            raise UserError(f"save=true needs a Hugging Face model (save_pretrained); model '{lm.name}' has none")
        checkpoint_format(targets, fmt)
        remove_stale_writes(Path(out_dir) / MODELS_DIR)  # of an earlier, killed run into this folder
    if depth != full_depth or depth == 0:
        return None
    dest = model_dir(out_dir, order, job.seed if job.several_seeds else None)
    scales = input_scales() if input_scales is not None else None
    return save_model(lm, targets, order, dest, fmt, job.dense_bits, act_scheme(job.act), scales)


TMP_MARK = ".tmp-"  # .<folder>.tmp-<host>-<pid>: a checkpoint being written, renamed into place when complete


def remove_stale_writes(folder: Path) -> list[Path]:
    """Remove the temporary checkpoint folders under `folder` (recursively) that a writer on this host left when
    it was killed: its process is gone. Another host's, or a live writer's, are left alone. Returns those removed."""
    removed = []
    host = socket.gethostname()
    for tmp in sorted(Path(folder).glob(f"**/.*{TMP_MARK}*")) if Path(folder).is_dir() else []:
        owner = tmp.name.rsplit(TMP_MARK, 1)[1]
        who, _, pid = owner.rpartition("-")
        if not tmp.is_dir() or who != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s: a checkpoint that a killed writer (pid %s) left half-written", tmp, pid)
        removed.append(tmp)
    return removed


def save_model(
    lm: LoadedModel,
    targets: dict[str, Target],
    order: tuple[str, ...],
    dest: Path,
    fmt: str = "auto",
    dense_bits: int = 16,
    act: ActScheme | None = None,
    input_scales: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model, tokenizer and sidecar into `dest`, replacing it whole (written beside, renamed). The
    sidecar's checkpoint entry records the weight files' bytes on disk beside the computed `size_bytes` (at
    `dense_bits` per uncompressed weight, as the run's metric). `act`: the input
    activations the node was evaluated with, written into a compressed-tensors config and recorded otherwise;
    `input_scales`: their static scales by layer name (ActQuant.input_scales), stored beside each layer's weight."""
    from compress_order.core.files import file_mode
    from compress_order.evaluation.measure import compression_metrics

    if any(getattr(m, "online_rotation", False) for m in lm.model.modules()):
        raise UserError(
            f"{' > '.join(order)} rotates layer inputs at run time (rotate online=true), which no checkpoint "
            f"format written here expresses; rebuild the order without online to save it"
        )
    size_bytes = compression_metrics(lm.model, targets, dense_bits)["size_bytes"]  # removed blocks count 0
    current = by_current_name(lm.model, targets)
    if input_scales is not None:  # by the names the checkpoint gives the layers
        names = {id(t): n for n, t in current.items()}
        input_scales = {names[id(targets[n])]: v for n, v in input_scales.items() if id(targets[n]) in names}
    targets = current
    fmt = checkpoint_format(targets, fmt)
    if fmt == "compressed-tensors" and all(t.constraint.grid is None for t in targets.values()):
        raise UserError(f"compressed-tensors packs quantization grids; {' > '.join(order)} holds none (save it dense)")
    remove_stale_writes(dest.parent)
    tmp = dest.with_name(f".{dest.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        record, tensors = constraint_record(renamed_after_removal(targets))
        with _as_plain_model(lm.model), without_removed_experts(lm.model, targets):
            if fmt == "compressed-tensors":
                checkpoint = save_compressed_tensors(lm.model, targets, tmp, act, input_scales)
            else:
                lm.model.save_pretrained(tmp)
                checkpoint = {"format": "dense"}
        if act is not None:
            checkpoint["activations"] = act.describe()
        checkpoint.update(
            disk_bytes=weight_bytes(tmp),
            dense_bits=dense_bits,
            size_bytes=size_bytes,
        )
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        record = {
            "format": FORMAT,
            "model": lm.name,
            "order": list(order),
            "label": " > ".join(order),
            "checkpoint": checkpoint,
            **record,
        }
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / SIDECAR_TENSORS))
        (tmp / SIDECAR).write_text(json.dumps(record, indent=1), encoding="utf-8")
        mode = file_mode()  # safetensors writes its files 0600; results are shared, like every other file
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(mode)
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


def save_compressed_tensors(
    model: torch.nn.Module,
    targets: dict[str, Target],
    save_dir: Path,
    act: ActScheme | None = None,
    input_scales: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A compressed-tensors checkpoint of the model as it is (pack-quantized; int-quantized with the input
    activations' scheme `act`); returns what the sidecar records."""
    from compress_order.export import compressed_tensors as ct_export
    from compress_order.export import serving

    # compressed-tensors 0.20 describes quantized nn.Linear modules; transformers keeps fused experts as 3-D
    # parameters no scheme names, so they are stored dense (their values exactly on their grids) and said so.
    scales = input_scales or {}
    packed = {
        n: ct_export.pack_layer(t, act, scales.get(n))
        for n, t in targets.items()
        if t.constraint.grid is not None and t.index is None
    }
    dense_experts = sum(1 for t in targets.values() if t.constraint.grid is not None and t.index is not None)
    schemes = {n: p.scheme for n, p in packed.items()}
    config = ct_export.quantization_config(schemes, ignore=ct_export.dense_linears(model, set(packed)))
    model.save_pretrained(save_dir, state_dict=ct_export.compressed_state_dict(model, packed))
    ct_export.write_config(str(save_dir), config)
    path, servable, reasons = serving.vllm_servability(model, schemes)
    mismatched = sum(p.mismatched for p in packed.values())
    return {
        "format": "compressed-tensors",
        "compression_format": config.format,
        "schemes": sorted({p.scheme.describe() for p in packed.values()}),
        "exact": mismatched == 0,  # reloading gives the evaluated weights bit for bit
        "mismatched_weights": mismatched,  # otherwise: weights changed by holding scales in the model dtype
        "vllm": {"path": path, "servable": servable, "reasons": reasons},  # path: WNA16, W8A8 int8, W4A8 int
        "transformers_reload": serving.transformers_reloads(schemes, next(model.parameters()).dtype),
        "dense_experts": dense_experts,  # quantized experts stored dense (see above)
    }


def weight_bytes(folder: Path) -> int:
    """Bytes on disk of a checkpoint's weight files (safetensors shards or .bin), not its config or tokenizer."""
    return sum(
        f.stat().st_size
        for f in Path(folder).iterdir()
        if f.suffix in (".safetensors", ".bin") and f.name != SIDECAR_TENSORS
    )


def summary_line(checkpoint: dict[str, Any]) -> str:
    """What a saved checkpoint is, in one line: its format, its bytes on disk beside the computed size and, for
    compressed-tensors, exactness and servability."""
    size = ""
    if "disk_bytes" in checkpoint:
        size = (
            f"; {checkpoint['disk_bytes']:,} bytes on disk, size_bytes {checkpoint['size_bytes']:,.0f} "
            f"({checkpoint['dense_bits']}-bit dense layers)"
        )
    if checkpoint["format"] != "compressed-tensors":
        act = checkpoint.get("activations")
        acts = f" (evaluated with {act} activations, not in its config)" if act else ""
        return f"{checkpoint['format']} checkpoint{acts}{size}"
    exact = "exact" if checkpoint["exact"] else f"{checkpoint['mismatched_weights']} weights not exact"
    if not checkpoint["exact"] and checkpoint["compression_format"] == "nvfp4-pack-quantized":
        exact += " (compressed-tensors 0.20 reads NVFP4 back in bfloat16)"
    vllm = checkpoint["vllm"]
    serve = (
        f"vLLM {vllm['path']} serves it"
        if vllm["servable"]
        else f"vLLM {vllm['path']} does not serve it: {'; '.join(vllm['reasons'])}"
    )
    reload = "; transformers reloads it" if checkpoint["transformers_reload"] else f"; {_no_reload(checkpoint)}"
    if checkpoint.get("dense_experts"):
        reload += (
            f"; {checkpoint['dense_experts']} quantized expert matrices stored dense (on their grids): "
            f"compressed-tensors 0.20 has no scheme for transformers' fused 3-D expert parameters"
        )
    return (
        f"compressed-tensors {checkpoint['compression_format']}, {', '.join(checkpoint['schemes'])}; {exact}; "
        f"{serve}{reload}{size}"
    )


def _no_reload(checkpoint: dict[str, Any]) -> str:
    """Why transformers does not reload a compressed-tensors checkpoint (see serving.transformers_reloads)."""
    fmt = checkpoint["compression_format"]
    if fmt.startswith(("nvfp4", "mxfp4")) or "FP4" in " ".join(checkpoint["schemes"]):
        return (
            "transformers cannot reload it: compressed-tensors 0.20 decompresses FP4 weights into bfloat16, "
            "which only a bfloat16 model runs"
        )
    return "transformers cannot reload its zero-points"


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
            "layout": t.adapter.layout,  # the stored tensor's axes in terms of `shape`
            "stored_shape": list(t.stored.shape),
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
                "format": g.fmt,
                "bits": g.bits,
                "group_size": g.group_size,
                "sym": g.sym,
                "n_groups": g.n_groups,
                "scale": f"{name}.scale",
                "zero": f"{name}.zero",
            }
            if getattr(g, "tensor_scale", None) is not None:  # NVFP4: the scales are E4M3 values over 1 / this
                entry["quant"]["tensor_scale"] = float(g.tensor_scale)
            tensors[f"{name}.scale"] = g.scale.detach().float().cpu().contiguous()
            tensors[f"{name}.zero"] = g.zero.detach().cpu().to(torch.uint8).contiguous()  # integers in [0, 2^bits-1]
        layers[name] = entry
    zeros = sum(int((t.weight == 0).sum()) for t in targets.values())
    total = sum(t.weight.numel() for t in targets.values())
    return {"weights_dtype": _dtype(targets), "sparsity": zeros / total, "layers": layers}, tensors


def _dtype(targets: dict[str, Target]) -> str:
    return str(next(iter(targets.values())).dtype).removeprefix("torch.")


def load_constraints(model_dir: str | Path) -> dict[str, Any]:
    """compression.json with its tensors filled in: masks as bool (rows, cols), scales and zeros as float32."""
    d = Path(model_dir)
    record = json.loads((d / SIDECAR).read_text(encoding="utf-8"))
    side = d / SIDECAR_TENSORS
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
