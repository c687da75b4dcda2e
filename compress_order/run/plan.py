"""Plan a run before doing it: the stage trie, each node's store key, what the store already holds, the cost.

`make_plan` needs no model, so `validate` and the start of `run -m` print the same cost line: jobs, nodes,
distinct nodes, nodes already stored, and the stage applications and evaluations still to do.

`predict_only=true` plans the dense root and its single-stage children only (the nodes the Progressive Intensity
Hypothesis reads): their keys are those of the full trie, so a later full run reuses them from the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from compress_order.config.stages import is_calibrated, stage_configs
from compress_order.run.identity import base_identity, node_key
from compress_order.run.store import NodeStore
from compress_order.run.trie import Node, build_trie


@dataclass
class Plan:
    stage_cfgs: list[dict]
    joint_cfgs: list[dict]
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
        return len(self.stage_cfgs)

    @property
    def by_label(self) -> dict[str, dict]:
        return {sc["label"]: sc for sc in self.stage_cfgs + self.joint_cfgs}

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


def make_plan(cfg: DictConfig, store: NodeStore, force: bool = False, predict_only: bool | None = None) -> Plan:
    """The run's trie and keys; `cfg.device` must be resolved. Reads only whether records exist.
    `predict_only` (default: the config's) keeps the dense and single-stage nodes only."""
    predict_only = bool(cfg.get("predict_only")) if predict_only is None else predict_only
    scfgs = stage_configs(cfg)
    jcfgs = stage_configs(cfg, key="joint") if cfg.get("joint") and not predict_only else []
    trie = build_trie([sc["label"] for sc in scfgs], [sc["label"] for sc in jcfgs])
    if predict_only:
        trie = singles(trie)
    base = base_identity(cfg)
    by_label = {sc["label"]: sc for sc in scfgs + jcfgs}
    calibration = OmegaConf.to_container(cfg.calibration, resolve=True)
    keys = {}
    for n in trie.walk():
        prefix = [by_label[lab] for lab in n.order]
        keys[n.order] = node_key(base, prefix, any(is_calibrated(sc) for sc in prefix), calibration, int(cfg.seed))
    done = {o: not force and store.has(k) for o, k in keys.items()}
    return Plan(scfgs, jcfgs, trie, keys, done, save=bool(cfg.get("save")), predict_only=predict_only)


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


def scratch_costs(cfg: DictConfig) -> tuple[Cost, Cost]:
    """(predict-only, full) cost of one run's config, every seed, with nothing stored: what the cut trie leaves out."""
    store = NodeStore(None)
    cut, full = (
        [make_plan(with_seed(cfg, s), store, force=True, predict_only=p) for s in run_seeds(cfg)] for p in (True, False)
    )
    return cost(cut, jobs=1), cost(full, jobs=1)


def run_seeds(cfg: DictConfig) -> list[int]:
    """The calibration seeds of a run: `seeds` if given, else `replicates` seeds from `seed` on."""
    if cfg.get("seeds") is not None:
        return [int(s) for s in cfg.seeds]
    return [int(cfg.seed) + i for i in range(int(cfg.get("replicates") or 1))]


def with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    """The run's config for one calibration seed (what a single-seed run with `seed=` would compose)."""
    out = cfg.copy()
    out.seed = seed
    out.replicates, out.seeds = 1, None
    return out


def plan_sweep(cfgs: list[DictConfig], predict_only: bool | None = None) -> tuple[list[Plan], int]:
    """Plans of every job of a sweep and every seed of a job (composed configs, as `validate` makes them),
    without loading anything; and the number of jobs. `predict_only=False` plans the full tries."""
    from compress_order.core.devices import resolve_device

    plans = []
    for cfg in cfgs:
        cfg = cfg.copy()
        cfg.device = str(resolve_device(str(cfg.device)))
        store = NodeStore(cfg.store_dir)
        plans += [
            make_plan(with_seed(cfg, s), store, force=bool(cfg.force), predict_only=predict_only)
            for s in run_seeds(cfg)
        ]
    return plans, len(cfgs)
