"""One run: plan (keys, store, cost) → execute (the stage trie) → record (tidy rows, summary, stats).

Every node of the trie (dense baseline, each prefix, each full order) is evaluated once across every run that
shares the store (identity.py says what makes two nodes the same); its record goes to the store and its rows to
results.parquet / results.csv immediately, so a crash loses at most the node in flight.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from compress_order import pipeline
from compress_order.backends import select_backends
from compress_order.errors import Interrupted
from compress_order.export import save_node
from compress_order.measure import reset_peak
from compress_order.paths import PACKAGE_DIR
from compress_order.identity import base_identity, digest, stage_identity
from compress_order.pipeline import RunContext
from compress_order.plan import Plan, cost, make_plan, run_seeds, with_seed
from compress_order.results import RunWriter, make_rows, summary_markdown, write_text
from compress_order.schema import STATS_FILE, SUMMARY, NodeRecord
from compress_order.state_cache import StateCache
from compress_order.store import NodeStore
from compress_order.targets import Snapshot
from compress_order.trie import Node, run_trie
from compress_order.validate import check_config, resolve_device

log = logging.getLogger("compress_order.runner")


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


@dataclass
class RunStats:
    """What a run did, written to run_stats.json: the cost plan's figures, measured."""

    nodes: int = 0
    evaluations: int = 0  # nodes evaluated by this run
    applications: int = 0  # stage applications (state-cache reloads not counted)
    from_store: int = 0  # nodes whose record was already stored when reached
    from_other_jobs: int = 0  # nodes another job was computing, picked up at the end
    taken_over: int = 0  # stale claims of dead jobs, computed here
    saved: int = 0
    wall_s: float = 0.0


def stage_list(scfgs: list[dict]) -> str:
    """The run's stages as data for the `stage_list` column (JSON): label, name, class, kind, whether calibrated,
    and resolved parameters, so analysis needs no config files or label parsing to know what a stage was."""
    from hydra.utils import get_object

    out = []
    for sc in scfgs:
        cls = get_object(sc["_target_"])
        out.append({"label": sc["label"], "name": sc["name"], "target": sc["_target_"], "kind": cls.kind,
                    "calibrated": cls.needs is not None, "params": stage_identity(sc)})  # fmt: skip
    return json.dumps(out, sort_keys=True)


def run(cfg: DictConfig, out_dir: Path, store: NodeStore | None = None) -> pd.DataFrame:
    """Plan (keys, store, cost) → execute (the trie, once per calibration seed) → record (rows, summary, stats).
    `store`: the node store of `store_dir` (a test passes one with its own clock)."""
    start = time.perf_counter()
    check_config(cfg)
    device = resolve_device(str(cfg.device))
    cfg.device = str(device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seeds = run_seeds(cfg)

    store = NodeStore(cfg.store_dir, float(cfg.store_claim_timeout)) if store is None else store
    jobs = [with_seed(cfg, s) for s in seeds]
    plans = [make_plan(c, store, force=bool(cfg.force)) for c in jobs]
    total = sum(len(p.nodes) for p in plans)
    log.info(cost(plans, jobs=1).line())
    base = digest(base_identity(cfg))
    context = {
        "run_id": f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{base[:8]}",
        "model": cfg.model.name, "dataset": cfg.data.name, "bits": cfg.bits, "sparsity": cfg.sparsity,
        "group_size": cfg.group_size, "act_bits": cfg.act_bits, "config_hash": base[:16], "git_sha": git_sha(),
        "torch_version": torch.__version__, "device": str(device), "library_versions": library_versions(),
    }  # fmt: skip
    writer = RunWriter(out_dir)
    stats = RunStats()
    executor = Executor(cfg, store, writer, out_dir, device, stats, keep_dense=len(seeds) > 1)
    try:
        for i, job in enumerate(jobs):  # seed-free nodes are stored by the first seed and reused by the others
            torch.manual_seed(int(job.seed))
            # a later seed is planned again: the seeds before it have stored the nodes they share
            plan = plans[0] if i == 0 else make_plan(job, store, force=bool(cfg.force))
            stats.nodes += len(plan.nodes)
            labels = ",".join(sc["label"] for sc in plan.stage_cfgs)
            context.update(stages=labels, stage_list=stage_list(plan.stage_cfgs + plan.joint_cfgs), seed=int(job.seed))
            executor.execute(job, plan, dict(context))
    except KeyboardInterrupt:
        finished = len({(r["order"], r["seed"]) for r in writer.rows})
        raise Interrupted(
            f"interrupted: {finished} of {total} nodes finished and stored in "
            f"{cfg.store_dir}; re-running the same command resumes from them"
        ) from None
    finally:
        store.close()

    df = writer.frame()
    summary = summary_markdown(df, executor.primary, executor.protocol)
    if plans[0].predict_only:
        summary += "\n" + _predicted(cfg, df, out_dir, executor.primary, stats)
    write_text(out_dir / SUMMARY, summary)
    stats.wall_s = round(time.perf_counter() - start, 3)
    write_text(out_dir / STATS_FILE, json.dumps(asdict(stats), indent=1))
    return df


def _predicted(cfg: DictConfig, df: pd.DataFrame, out_dir: Path, metric: str, stats: RunStats) -> str:
    """predict_only: the order the PIH predicts from the singles (predicted.md / .csv), and what was not run."""
    from compress_order.analysis import write_predictions
    from compress_order.plan import scratch_costs

    cut, full = scratch_costs(cfg)
    done = (f"this run: {stats.evaluations} evaluation(s), {stats.applications} stage application(s), "
            f"{stats.from_store} node(s) from the store; from scratch these {cut.distinct} nodes cost "
            f"{cut.applications} stage applications, the full trie {full.distinct} nodes and {full.applications} "
            f"(not run: {full.distinct - cut.distinct} nodes, {full.applications - cut.applications} stage "
            f"applications); a full run with the same store reuses these nodes")  # fmt: skip
    return write_predictions(df, out_dir, metric, done)


class Executor:
    """Walks one plan's trie at a time over a model loaded once (on first need): reuses stored nodes, claims and
    evaluates the others, defers those another job is computing and picks them up at the end."""

    def __init__(self, cfg: DictConfig, store: NodeStore, writer: RunWriter, out_dir: Path, device: torch.device,
                 stats: RunStats, keep_dense: bool) -> None:  # fmt: skip
        self.cfg, self.store, self.writer, self.out_dir, self.device = cfg, store, writer, out_dir, device
        self.stats, self.keep_dense = stats, keep_dense
        self.primary, self.protocol = "perplexity", ""
        self.ctx: RunContext | None = None
        self._dense: Snapshot | None = None

    def _load(self) -> RunContext:
        cfg = self.cfg
        self.ctx = RunContext.load(cfg, self.device)
        self.backends = select_backends(cfg.eval.get("backends", "auto"), self.device)
        sc = cfg.get("state_cache") or {}
        self.cache = StateCache(sc.get("dir"), float(sc.get("max_gb", 20)))
        if self.keep_dense:  # several tries start from the dense weights
            self._dense = self.ctx.state.snapshot()
        return self.ctx

    def dense(self) -> Snapshot:
        """The dense weights: kept from the load when several seeds need them, else rebuilt from a fresh load."""
        if self._dense is None:
            assert self.ctx is not None
            self._dense = self.ctx.fresh_dense(self.cfg)
        return self._dense

    def execute(self, cfg: DictConfig, plan: Plan, context: dict) -> None:
        store, stats = self.store, self.stats
        records = {o: store.get(k) for o, k in plan.keys.items() if plan.done[o]}
        plan.done.update({o: rec is not None for o, rec in records.items()})  # a damaged record was quarantined

        def emit(node: Node, rec: NodeRecord) -> None:
            key = plan.keys[node.order]
            self.writer.add(make_rows(context, node.label, node.depth, key, rec), rec.samples, node.label, key)

        if not plan.needed(plan.trie):  # everything is in the store: no model needed
            for n in plan.nodes:
                rec = records[n.order]
                self.primary, self.protocol = rec.primary, rec.protocol
                emit(n, rec)
                stats.from_store += 1
            return

        first = self.ctx is None
        reset_peak(self.device)  # the dense node's peak includes loading the model
        if self.ctx is None:
            ctx = self._load()
        else:
            ctx = self.ctx
            ctx.state.restore(self.dense())
        state = ctx.state
        stages = ctx.build_stages(plan.by_label)
        task = ctx.task(cfg)
        self.primary, self.protocol = task.primary_metric, task.protocol
        bar = tqdm(total=len(plan.nodes), desc="orders" if first else f"orders, seed {cfg.seed}", unit="node")
        deferred: list[Node] = []
        infeasible: dict[tuple, str] = {}  # order -> why (its subtree inherits it; nothing is applied there)

        def infeasible_record(why: str) -> NodeRecord:
            return pipeline.infeasible_record(why, self.primary, self.protocol)

        def evaluate(node: Node) -> NodeRecord:
            rec = ctx.evaluate(task, cfg, self.backends)
            store.put(plan.keys[node.order], rec)
            stats.evaluations += 1
            return rec

        def finish(node: Node, rec: NodeRecord) -> None:
            emit(node, rec)
            bar.set_postfix_str(node.label)
            bar.update(1)

        def visit(node: Node) -> None:
            if node.order in infeasible and records.get(node.order) is None:
                records[node.order] = infeasible_record(infeasible[node.order])
                store.put(plan.keys[node.order], records[node.order])
            rec = records.get(node.order)
            status, rec = ("stored", rec) if rec is not None else store.claim(plan.keys[node.order])
            if status == "claimed":
                try:
                    rec = evaluate(node)
                finally:
                    store.release(plan.keys[node.order])
            stats.from_store += status == "stored"
            if cfg.save and node.order not in infeasible:
                dest = save_node(ctx.lm, ctx.targets, node, plan.full_depth, self.out_dir, cfg,
                                 len(run_seeds(self.cfg)) > 1)  # fmt: skip
                stats.saved += dest is not None
            if status == "busy":  # another job is evaluating it: go on, pick its record up at the end
                deferred.append(node)
            else:
                finish(node, rec)

        def apply(node: Node) -> None:
            reset_peak(self.device)
            key = plan.keys[node.order]
            snap = self.cache.load(key) if plan.done[node.order] else None
            if snap is not None:  # a finished inner node of an earlier run: reload instead of recomputing
                state.restore(snap)
                return
            parent = node.order[:-1]
            why = infeasible.get(parent) or ctx.apply(stages[node.stage], task, cfg)
            if why is not None:  # the state is left as the parent's: the subtree is reported, not computed
                infeasible[node.order] = why
                log.warning("order %s is infeasible: %s", node.label, why)
                return
            stats.applications += 1
            if node.children and self.cache.root is not None:
                self.cache.save(key, state.snapshot())

        try:
            run_trie(plan.trie, state, apply, visit, needed=plan.needed)
            for node, rec in store.wait({n: plan.keys[n.order] for n in deferred}):
                if rec is None:  # its owner died: rebuild the node from the dense weights and compute it here
                    state.restore(self.dense())
                    why = None
                    for lab in node.order:
                        why = why or ctx.apply(stages[lab], task, cfg)
                        stats.applications += why is None
                    try:
                        rec = evaluate(node) if why is None else infeasible_record(why)
                        if why is not None:
                            store.put(plan.keys[node.order], rec)
                    finally:
                        store.release(plan.keys[node.order])
                    stats.taken_over += 1
                else:
                    stats.from_other_jobs += 1
                finish(node, rec)
        except BaseException:
            bar.leave = False  # an error or Ctrl-C ends with its own one line, not a half-finished bar
            raise
        finally:
            bar.close()
