"""One run: config → model + data → stage trie → evaluation → tidy rows → summary.

Every node of the trie (dense baseline, each prefix, each full order) is evaluated once; its record goes
to the node store and its rows to results.parquet / results.csv immediately, so a crash loses at most the
node in flight.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import compress_order
from compress_order.backends import SIMULATED, select_backends
from compress_order.config import build
from compress_order.errors import Interrupted
from compress_order.export import save_node
from compress_order.measure import compression_metrics
from compress_order.metrics import METRICS
from compress_order.paths import PACKAGE_DIR
from compress_order.results import NodeStore, RunWriter, make_rows, summary_markdown, write_text
from compress_order.stages import build_stage, stage_configs
from compress_order.state_cache import StateCache
from compress_order.stages.base import Stage
from compress_order.targets import ModelState, find_targets
from compress_order.tasks import Task, build_task
from compress_order.trie import Node, build_trie, run_trie
from compress_order.validate import check_config, resolve_device

# Keys that change where results go, not what they are.
NON_IDENTITY_KEYS = ("hydra", "store_dir", "force", "threads", "stages", "joint", "state_cache", "save")


@lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@lru_cache(maxsize=1)
def library_versions() -> str:
    """Versions of the libraries that shape a result, as a JSON object for the `library_versions` column."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "timm", "datasets", "hydra-core", "numpy", "torchao"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return json.dumps(out, sort_keys=True)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def identity(cfg: DictConfig) -> dict:
    """Everything besides the stage prefix that determines a node's result."""
    c = OmegaConf.to_container(cfg, resolve=True)
    base = {k: v for k, v in c.items() if k not in NON_IDENTITY_KEYS}
    base["code"] = [compress_order.__version__, git_sha()]
    return base


def apply_stage(stage: Stage, state: ModelState, task: Task, cfg: DictConfig) -> None:
    """Apply one stage to every target layer, then check every layer's invariants."""
    if stage.needs is None:
        for t in state.targets.values():
            stage.compress(t, None)
    else:
        from compress_order.calibration import calibrate_and_compress

        calibrate_and_compress(state.model, state.targets, task.calibration_batches(), stage, cfg.calibration)
    state.check()


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    check_config(cfg)
    device = resolve_device(str(cfg.device))
    cfg.device = str(device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))

    scfgs = stage_configs(cfg)
    jcfgs = stage_configs(cfg, key="joint") if cfg.get("joint") else []
    stages = {sc["label"]: build_stage(sc) for sc in scfgs + jcfgs}
    by_label = {sc["label"]: sc for sc in scfgs + jcfgs}
    trie = build_trie([sc["label"] for sc in scfgs], [sc["label"] for sc in jcfgs])
    nodes = list(trie.walk())

    base = identity(cfg)
    keys = {n.order: digest({"base": base, "prefix": [by_label[lab] for lab in n.order]}) for n in nodes}
    store = NodeStore(cfg.store_dir)
    stored = {n.order: None if cfg.force else store.get(keys[n.order]) for n in nodes}  # read once
    done = {order: rec is not None for order, rec in stored.items()}
    needed = {n.order: any(not done[d.order] for d in n.walk()) for n in nodes}

    context = {
        "run_id": f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{digest(base)[:8]}",
        "model": cfg.model.name, "dataset": cfg.data.name, "stages": ",".join(sc["label"] for sc in scfgs),
        "bits": cfg.bits, "sparsity": cfg.sparsity, "group_size": cfg.group_size, "seed": cfg.seed,
        "config_hash": digest(base)[:16], "git_sha": git_sha(), "torch_version": torch.__version__,
        "device": str(device), "library_versions": library_versions(),
    }  # fmt: skip
    writer = RunWriter(out_dir)
    primary, protocol = "perplexity", ""

    if not needed[()]:  # everything is in the store: no model needed
        for n in nodes:
            rec = stored[n.order]
            primary, protocol = rec.get("primary", primary), rec.get("protocol", protocol)
            _emit(writer, context, n, keys[n.order], rec)
    else:
        lm = build(cfg.model)
        data = build(cfg.data)
        lm.model.to(device)
        targets = find_targets(lm.model, lm.skip)
        for s in stages.values():
            s.validate(targets)
        task = build_task(lm, data, cfg)
        primary, protocol = task.primary_metric, task.protocol
        backends = select_backends(cfg.eval.get("backends", "auto"), device)
        sc = cfg.get("state_cache") or {}
        cache = StateCache(sc.get("dir"), float(sc.get("max_gb", 20)))
        state = ModelState(lm.model, targets)
        bar = tqdm(total=len(nodes), desc="orders", unit="node")

        def visit(node: Node) -> None:
            key = keys[node.order]
            rec = stored[node.order]
            if rec is None:
                metrics, samples = task.evaluate(lm.model)
                metrics.update(compression_metrics(lm.model, targets, int(cfg.dense_bits)))
                metrics.update(task.latency(lm.model))
                rec = {
                    "entries": [{"metric": m, "value": v, "backend": SIMULATED,
                                 "higher_is_better": METRICS[m].higher_is_better} for m, v in metrics.items()]
                    + backend_entries(backends, lm.model, targets, task, device),
                    "samples": {k: v.tolist() for k, v in samples.items()}, "primary": primary, "protocol": protocol,
                    "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }  # fmt: skip
                store.put(key, rec)
            _emit(writer, context, node, key, rec)
            if cfg.get("save"):  # full orders computed in this run: write the compressed model
                save_node(lm, targets, node, len(scfgs), out_dir, computed=not done[node.order])
            bar.set_postfix_str(node.label)
            bar.update(1)

        def apply(node: Node) -> None:
            key = keys[node.order]
            snap = cache.load(key) if done[node.order] else None
            if snap is not None:  # a finished inner node of an earlier run: reload instead of recomputing
                state.restore(snap)
                return
            apply_stage(stages[node.stage], state, task, cfg)
            if node.children and cache.root is not None:
                cache.save(key, state.snapshot())

        try:
            run_trie(trie, state, apply, visit, needed=lambda n: needed[n.order])
        except KeyboardInterrupt:
            bar.close()
            finished = len({r["order"] for r in writer.rows})
            raise Interrupted(
                f"interrupted: {finished} of {len(nodes)} nodes finished and stored in {cfg.store_dir}; "
                f"re-running the same command resumes from them"
            ) from None
        bar.close()

    df = writer.frame()
    text = summary_markdown(df, primary, protocol)
    write_text(out_dir / "summary.md", text)
    return df


def backend_entries(backends: list, model, targets, task: Task, device: torch.device) -> list[dict]:
    """Latency of each deployable backend on a packed copy of the model, or n/a with the reason."""
    out = []
    for b in backends:
        why = b.fits(targets)
        if why is None:
            try:
                packed = b.convert(model, targets, device)
                out += [{"metric": m, "value": v, "backend": b.name} for m, v in task.latency(packed).items()]
                del packed
                continue
            except (RuntimeError, NotImplementedError, ImportError, AssertionError) as e:  # no kernel at run time
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        out.append({"metric": "latency_ms", "value": float("nan"), "backend": b.name, "status": "n/a", "error": why})
    return out


def _emit(writer: RunWriter, context: dict, node: Node, key: str, rec: dict) -> None:
    rows = make_rows(context, node.label, node.depth, key, rec["entries"], rec["timestamp"])
    writer.add(rows, rec.get("samples", {}), node.label, key)
