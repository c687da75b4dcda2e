"""Plan a run before doing it: the stage trie, each node's store key, what the store already holds, the cost.

`make_plan` needs no model, so `validate` and the start of `run -m` print the same cost line: jobs, nodes,
distinct nodes, nodes already stored, and the stage applications and evaluations still to do.

`predict_only=true` plans the dense root and its single-stage children only (the nodes the Progressive Intensity
Hypothesis reads): their keys are those of the full trie, so a later full run reuses them from the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress_order.config.stages import is_calibrated
from compress_order.core.settings import RunSettings, StageSpec
from compress_order.run.identity import base_identity, node_key
from compress_order.run.store import NodeStore
from compress_order.run.trie import Node, build_trie, restrict


@dataclass
class Plan:
    stages: tuple[StageSpec, ...]
    joint: tuple[StageSpec, ...]
    trie: Node
    keys: dict[tuple[str, ...], str]  # node order → store key
    done: dict[tuple[str, ...], bool]  # the store holds the node's record
    save: bool = False  # full orders must be rebuilt (to be written) even when stored
    predict_only: bool = False  # the trie is cut to depth 1 (dense and single stages)
    nodes: list[Node] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.trie.walk())

    @property
    def full_depth(self) -> int:
        return len(self.stages)

    @property
    def by_label(self) -> dict[str, StageSpec]:
        return {s.label: s for s in self.stages + self.joint}

    def needed(self, node: Node, done: dict[tuple[str, ...], bool] | None = None) -> bool:
        """The node or a descendant still has work: an evaluation, or a full order to rebuild and save."""
        done = self.done if done is None else done
        return any(not done[d.order] or (self.save and d.order and d.depth == self.full_depth) for d in node.walk())

    def applications(self, done: dict[tuple[str, ...], bool] | None = None) -> int:
        """Stage applications a run does: every node below the root that is still needed."""
        return sum(1 for n in self.nodes if n.order and self.needed(n, done))


def singles(trie: Node) -> Node:
    """The dense root and its single-stage children (a joint schedule stands for a full order: not one of them)."""
    return Node((), [Node(c.order) for c in trie.children if c.covers is None])


def plan_trie(settings: RunSettings, predict_only: bool) -> Node:
    """The nodes a job computes: every order of the stages (and joint schedules), cut to the dense model and the
    singles by `predict_only`, or to the listed `orders` and their prefixes."""
    joint = settings.joint if not predict_only else ()
    trie = build_trie([s.label for s in settings.stages], [s.label for s in joint])
    if predict_only:
        return singles(trie)
    return restrict(trie, settings.orders) if settings.orders is not None else trie


def make_plan(settings: RunSettings, store: NodeStore, predict_only: bool | None = None) -> Plan:
    """The trie and keys of one seed's job (`settings.seed`). Reads only whether records exist.
    `predict_only` (default: the settings') keeps the dense and single-stage nodes only."""
    predict_only = settings.predict_only if predict_only is None else predict_only
    joint = settings.joint if not predict_only else ()
    trie = plan_trie(settings, predict_only)
    base = base_identity(settings)
    by_label = {s.label: s for s in settings.stages + joint}
    keys = {}
    for n in trie.walk():
        prefix = [by_label[lab] for lab in n.order]
        calibrated = any(is_calibrated(s) for s in prefix)
        keys[n.order] = node_key(base, prefix, calibrated, settings.calibration, settings.seed)
    done = {o: not settings.store.force and store.has(k) for o, k in keys.items()}
    return Plan(settings.stages, joint, trie, keys, done, save=settings.save.enabled, predict_only=predict_only)


@dataclass
class Cost:
    jobs: int
    nodes: int
    distinct: int
    stored: int
    applications: int
    evaluations: int

    def line(self) -> str:
        return (
            f"plan: {self.jobs} job(s), {self.nodes} nodes, {self.distinct} distinct, {self.stored} stored; "
            f"to do: {self.applications} stage applications, {self.evaluations} evaluations"
        )


def cost(plans: list[Plan], jobs: int | None = None) -> Cost:
    """What a sweep of these plans (in launch order, one store; a job with replicates has one plan a seed) still
    has to do: a node another plan evaluates first is not evaluated again, but each plan applies the stages its
    own unfinished nodes sit under."""
    keys = [k for p in plans for k in p.keys.values()]
    stored = {k for p in plans for o, k in p.keys.items() if p.done[o]}
    evaluated: set[str] = set(stored)
    applications = 0
    for p in plans:
        done = {o: k in evaluated for o, k in p.keys.items()}
        applications += p.applications(done)
        evaluated |= set(p.keys.values())
    distinct = set(keys)
    return Cost(jobs or len(plans), len(keys), len(distinct), len(stored), applications, len(distinct - stored))


def saving(plans: list[Plan], full: list[Plan], jobs: int | None = None) -> str:
    """What predict-only plans leave out of the same configs' full plans (same store), as one line."""
    cut, whole = cost(plans, jobs), cost(full, jobs)
    return (
        f"predict_only: {cut.distinct} of {whole.distinct} distinct nodes (dense and single stages); saves "
        f"{whole.applications - cut.applications} of {whole.applications} stage applications and "
        f"{whole.evaluations - cut.evaluations} of {whole.evaluations} evaluations still to do for the full trie"
    )


def scratch_costs(settings: RunSettings) -> tuple[Cost, Cost]:
    """(predict-only, full) cost of one run, every seed, with nothing stored: what the cut trie leaves out."""
    store = NodeStore(None)  # holds nothing
    cut, full = (
        [make_plan(settings.with_seed(s), store, predict_only=p) for s in settings.seeds] for p in (True, False)
    )
    return cost(cut, jobs=1), cost(full, jobs=1)


def plan_sweep(jobs: list[RunSettings], predict_only: bool | None = None) -> tuple[list[Plan], int]:
    """Plans of every job of a sweep and every seed of a job, without loading anything; and the number of jobs.
    `predict_only=False` plans the full tries."""
    plans = []
    for settings in jobs:
        store = NodeStore(settings.store.dir)
        plans += [make_plan(settings.with_seed(s), store, predict_only=predict_only) for s in settings.seeds]
    return plans, len(jobs)
