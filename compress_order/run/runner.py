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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from compress_order.core.errors import Interrupted
from compress_order.core.files import write_text
from compress_order.core.memory import return_freed_blocks, trim_heap
from compress_order.core.paths import PACKAGE_DIR
from compress_order.core.schema import STATS_FILE, SUMMARY, NodeRecord
from compress_order.core.settings import RunSettings, StageSpec
from compress_order.evaluation.backends import BACKENDS
from compress_order.evaluation.measure import reset_peak
from compress_order.export.checkpoint import save_node
from compress_order.modeling.targets import Snapshot
from compress_order.run import pipeline
from compress_order.run.identity import base_identity, digest, library_versions, stage_identity
from compress_order.run.pipeline import RunContext
from compress_order.run.plan import Plan, cost, make_plan
from compress_order.run.rows import RunWriter, make_rows
from compress_order.run.state_cache import StateCache
from compress_order.run.store import NodeStore
from compress_order.run.summary import summary_markdown
from compress_order.run.trie import Node, run_trie

log = logging.getLogger("compress_order.run.runner")


@lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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
    latency_timings: int = 0  # distinct model shapes whose dense-simulated latency was timed (pipeline.RunContext)
    wall_s: float = 0.0
    # calibration tokens per expert (min / median / max, experts without any) per MoE layer, by node
    expert_tokens: dict = field(default_factory=dict)
    removed_blocks: dict = field(default_factory=dict)  # the blocks (indices as loaded) each node has removed


def stage_list(specs: tuple[StageSpec, ...]) -> str:
    """The run's stages as data for the `stage_list` column (JSON): label, name, class, kind, whether calibrated,
    and resolved parameters, so analysis needs no config files or label parsing to know what a stage was."""
    from hydra.utils import get_object

    out = []
    for spec in specs:
        cls = get_object(spec.target)
        out.append(
            {
                "label": spec.label,
                "name": spec.name,
                "target": spec.target,
                "kind": cls.kind,
                "calibrated": cls.needs is not None,
                "params": stage_identity(spec),
            }
        )
    return json.dumps(out, sort_keys=True)


def run(settings: RunSettings, out_dir: Path, store: NodeStore | None = None) -> pd.DataFrame:
    """Plan (keys, store, cost) → execute (the trie, once per calibration seed) → record (rows, summary, stats).
    `store`: the node store of `store_dir` (a test passes one with its own clock)."""
    start = time.perf_counter()
    return_freed_blocks()  # stage temporaries must not stay resident beside the trie's checkpoints
    if settings.threads:
        torch.set_num_threads(settings.threads)
    store = NodeStore(settings.store.dir, settings.store.claim_timeout) if store is None else store
    jobs = [settings.with_seed(s) for s in settings.seeds]
    plans = [make_plan(job, store) for job in jobs]
    total = sum(len(p.nodes) for p in plans)
    log.info(cost(plans, jobs=1).line())
    base = digest(base_identity(settings))
    act = settings.act
    context = {
        "run_id": f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{base[:8]}",
        "model": settings.model.name,
        "dataset": settings.data.name,
        "bits": settings.bits,
        "sparsity": settings.sparsity,
        "group_size": settings.group_size,
        "act_bits": None if act is None else act.bits,
        "format": settings.format,
        # the activations' format: int for act_bits alone, empty for full-precision activations (as act_bits)
        "act_format": None if act is None else act.format or "int",
        "config_hash": base[:16],
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "device": settings.device,
        "library_versions": json.dumps(library_versions(), sort_keys=True),
    }
    writer = RunWriter(out_dir)
    stats = RunStats()
    executor = Executor(settings, store, writer, out_dir, stats)
    try:
        for i, job in enumerate(jobs):  # seed-free nodes are stored by the first seed and reused by the others
            torch.manual_seed(job.seed)
            # a later seed is planned again: the seeds before it have stored the nodes they share
            plan = plans[0] if i == 0 else make_plan(job, store)
            stats.nodes += len(plan.nodes)
            labels = ",".join(s.label for s in plan.stages)
            context.update(
                stages=labels,
                stage_list=stage_list(plan.stages + plan.joint),
                seed=job.seed,
                expert_sparsity=next(
                    (s.params["expert_sparsity"] for s in plan.stages if "expert_sparsity" in s.params), None
                ),
            )
            executor.execute(job, plan, dict(context))
    except KeyboardInterrupt:
        finished = len({(r["order"], r["seed"]) for r in writer.rows})
        raise Interrupted(
            f"interrupted: {finished} of {total} nodes finished and stored in "
            f"{settings.store.dir}; re-running the same command resumes from them"
        ) from None
    finally:
        store.close()

    df = writer.frame()
    summary = summary_markdown(df, executor.primary, executor.protocol)
    if executor.ctx is not None and executor.ctx.coverage is not None:
        summary += f"- {executor.ctx.coverage.line(_full_coverage(df))}\n"
    if executor.ctx is not None and stats.evaluations:
        stats.latency_timings = len(executor.ctx.latency)
        summary += (
            f"- latency (dense-simulated): timed once per distinct model shape, {stats.latency_timings} timing(s) "
            f"for {stats.evaluations} evaluated node(s); nodes of one shape and dtype share the figure (a dense "
            f"kernel's time does not depend on the weights' values)\n"
        )
    if plans[0].predict_only:
        summary += "\n" + _predicted(settings, df, out_dir, executor.primary, stats)
    write_text(out_dir / SUMMARY, summary)
    stats.wall_s = round(time.perf_counter() - start, 3)
    write_text(out_dir / STATS_FILE, json.dumps(asdict(stats), indent=1))
    return df


def _full_coverage(df: pd.DataFrame) -> float | None:
    """The smallest `coverage` of the deepest nodes (the full orders) in the rows, if measured."""
    rows = df[(df["metric"] == "coverage") & (df["status"] == "ok")]
    return None if rows.empty else float(rows[rows["depth"] == rows["depth"].max()]["value"].min())


def _predicted(settings: RunSettings, df: pd.DataFrame, out_dir: Path, metric: str, stats: RunStats) -> str:
    """predict_only: the order the PIH predicts from the singles (predicted.md / .csv), and what was not run."""
    from compress_order.analysis.report import write_predictions
    from compress_order.run.plan import scratch_costs

    cut, full = scratch_costs(settings)
    done = (
        f"this run: {stats.evaluations} evaluation(s), {stats.applications} stage application(s), "
        f"{stats.from_store} node(s) from the store; from scratch these {cut.distinct} nodes cost "
        f"{cut.applications} stage applications, the full trie {full.distinct} nodes and {full.applications} "
        f"(not run: {full.distinct - cut.distinct} nodes, {full.applications - cut.applications} stage "
        f"applications); a full run with the same store reuses these nodes"
    )
    return write_predictions(df, out_dir, metric, done)


class Executor:
    """Runs the plans of one run, one calibration seed at a time, over a model loaded once (on first need)."""

    def __init__(
        self, settings: RunSettings, store: NodeStore, writer: RunWriter, out_dir: Path, stats: RunStats
    ) -> None:
        self.settings, self.store, self.writer, self.out_dir, self.stats = settings, store, writer, out_dir, stats
        self.device = torch.device(settings.device)
        self.primary, self.protocol = "perplexity", ""
        self.ctx: RunContext | None = None
        self._dense: Snapshot | None = None

    def _load(self) -> RunContext:
        self.ctx = RunContext.load(self.settings)
        self.backends = [BACKENDS.lookup(name) for name in self.settings.eval.backends]
        self.cache = StateCache(self.settings.store.cache_dir, self.settings.store.cache_max_gb)
        if self.settings.several_seeds:  # several tries start from the dense weights
            self._dense = self.ctx.state.snapshot()
            self.ctx.state.share(self._dense)  # the trie's root checkpoint refers to it rather than copy again
        return self.ctx

    def dense(self) -> Snapshot:
        """The dense weights: kept from the load when several seeds need them, else rebuilt from a fresh load."""
        if self._dense is None:
            assert self.ctx is not None
            self._dense = self.ctx.fresh_dense(self.settings.model)
        return self._dense

    def execute(self, job: RunSettings, plan: Plan, context: dict) -> None:
        """One seed's plan: every node's rows, from the store where it has them, else computed (`TrieWalk`)."""
        records = {o: self.store.get(k) for o, k in plan.keys.items() if plan.done[o]}
        plan.done.update({o: rec is not None for o, rec in records.items()})  # a damaged record was quarantined
        if not plan.needed(plan.trie):  # everything is in the store: no model needed
            for node in plan.nodes:
                rec = records[node.order]
                self.primary, self.protocol = rec.primary, rec.protocol
                self.emit(plan, context, node, rec)
                self.stats.from_store += 1
            return
        first = self.ctx is None
        reset_peak(self.device)  # the dense node's peak includes loading the model
        if self.ctx is None:
            ctx = self._load()
        else:
            ctx = self.ctx
            ctx.state.restore(self.dense())
        walk = TrieWalk(self, ctx, job, plan, context, records)
        self.primary, self.protocol = walk.task.primary_metric, walk.task.protocol
        walk.run("orders" if first else f"orders, seed {job.seed}")

    def emit(self, plan: Plan, context: dict, node: Node, rec: NodeRecord) -> None:
        key = plan.keys[node.order]
        self.writer.add(make_rows(context, node.label, node.depth, key, rec), rec.samples, node.label, key)


class TrieWalk:
    """One plan's trie over the loaded model: applies each stage once per prefix, reuses stored nodes, claims and
    evaluates the others, defers those another job is computing and picks them up (or takes them over) at the end.
    An infeasible node (a stage cannot follow what the layers hold) is recorded as such with its whole subtree."""

    def __init__(
        self,
        ex: Executor,
        ctx: RunContext,
        job: RunSettings,
        plan: Plan,
        context: dict,
        records: dict[tuple, NodeRecord | None],
    ) -> None:
        self.ex, self.ctx, self.job, self.plan, self.context, self.records = ex, ctx, job, plan, context, records
        self.store, self.stats = ex.store, ex.stats
        self.stages = ctx.build_stages(plan.by_label)  # checked against the layers before any work
        self.task = ctx.task(job)
        trim_heap()  # what building the task freed (word perplexity's tokens, the dense reference) goes back
        # the structure a stage needs (a scaling producer), also before any work
        ctx.check_model(self.stages, self.task, job.calibration)
        self.deferred: list[Node] = []
        self.infeasible: dict[tuple, str] = {}  # order -> why (its subtree inherits it; nothing is applied there)

    def run(self, desc: str) -> None:
        self.bar = tqdm(total=len(self.plan.nodes), desc=desc, unit="node")
        try:
            run_trie(self.plan.trie, self.ctx.state, self.apply, self.visit, needed=self.plan.needed)
            for node, rec in self.store.wait({n: self.plan.keys[n.order] for n in self.deferred}):
                if rec is None:  # its owner died: the claim is ours now
                    rec = self.take_over(node)
                else:
                    self.stats.from_other_jobs += 1
                self.finish(node, rec)
        except BaseException:
            self.bar.leave = False  # an error or Ctrl-C ends with its own one line, not a half-finished bar
            raise
        finally:
            self.bar.close()

    def apply(self, node: Node) -> None:
        """Bring the model from the node's parent to the node: reload a cached state, or apply its last stage."""
        reset_peak(self.ex.device)
        key, cache = self.plan.keys[node.order], self.ex.cache
        snap = cache.load(key) if self.plan.done[node.order] else None
        if snap is not None:  # a finished inner node of an earlier run: reload instead of recomputing
            self.ctx.state.restore(snap)
            return
        report: dict = {}
        why = self.infeasible.get(node.order[:-1]) or self.ctx.apply(
            self.stages[node.stage], self.task, self.job.calibration, report
        )
        if report:
            self.stats.expert_tokens[node.label] = report
        if why is not None:  # the state is left as the parent's: the subtree is reported, not computed
            self.infeasible[node.order] = why
            log.warning("order %s is infeasible: %s", node.label, why)
            return
        self.stats.applications += 1
        blocks = self.ctx.state.blocks
        if blocks is not None and blocks.removed:
            self.stats.removed_blocks[node.label] = list(blocks.removed)
        if node.children and cache.root is not None:
            cache.save(key, self.ctx.state.snapshot())

    def visit(self, node: Node) -> None:
        """The model holds the node: report it from the store, or claim and evaluate it, or defer it (busy)."""
        key = self.plan.keys[node.order]
        if node.order in self.infeasible and self.records.get(node.order) is None:
            self.records[node.order] = self.infeasible_record(self.infeasible[node.order])
            self.store.put(key, self.records[node.order])
        rec = self.records.get(node.order)
        status, rec = ("stored", rec) if rec is not None else self.store.claim(key)
        if status == "claimed":
            try:
                rec = self.evaluate(node)
            finally:
                self.store.release(key)
        self.stats.from_store += status == "stored"
        if self.job.save.enabled and node.order not in self.infeasible:
            dest = save_node(
                self.ctx.lm,
                self.ctx.targets,
                node.order,
                node.depth,
                self.plan.full_depth,
                self.ex.out_dir,
                self.job,
                lambda: self.ctx.input_scales(self.task),
            )
            self.stats.saved += dest is not None
        if status == "busy":  # another job is evaluating it: go on, pick its record up at the end
            self.deferred.append(node)
        else:
            self.finish(node, rec)

    def take_over(self, node: Node) -> NodeRecord:
        """A deferred node whose owner died: rebuilt from the dense weights and computed here."""
        key = self.plan.keys[node.order]
        self.ctx.state.restore(self.ex.dense())
        why = None
        for lab in node.order:
            why = why or self.ctx.apply(self.stages[lab], self.task, self.job.calibration)
            self.stats.applications += why is None
        try:
            if why is None:
                rec = self.evaluate(node)
            else:
                rec = self.infeasible_record(why)
                self.store.put(key, rec)
        finally:
            self.store.release(key)
        self.stats.taken_over += 1
        return rec

    def evaluate(self, node: Node) -> NodeRecord:
        rec = self.ctx.evaluate(self.task, self.job.dense_bits, self.ex.backends)
        self.store.put(self.plan.keys[node.order], rec)
        self.stats.evaluations += 1
        return rec

    def infeasible_record(self, why: str) -> NodeRecord:
        return pipeline.infeasible_record(why, self.task.primary_metric, self.task.protocol)

    def finish(self, node: Node, rec: NodeRecord) -> None:
        self.ex.emit(self.plan, self.context, node, rec)
        self.bar.set_postfix_str(node.label)
        self.bar.update(1)
