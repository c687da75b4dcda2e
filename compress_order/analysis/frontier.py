"""Decision maps: which node of a grid to deploy under a budget.

Every node of the given runs (dense, single stages, partial and full orders, joint schedules) becomes one point:
its metric and its cost (`size_bytes`, `avg_bits`, `latency_ms`), each the mean over calibration seeds. A node
that several settings of a sweep share (the dense model, one stage alone at one setting) is one point, recognised
by its `node_key` (the store's identity of what determines it). From these points:

* the Pareto frontier of metric against one cost: the nodes no other node dominates (another node at ≤ cost with
  a better-or-equal metric, strictly better in one of the two); nodes tied in both are all kept;
* the best node within a budget, with its interval and whether the runner-up is distinguishable from it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from compress_order.analysis import bootstrap
from compress_order.analysis.tables import TABLE_INDEX, direction, keyed_like, node_values, order_pattern, stage_kind
from compress_order.core.errors import UserError, choices
from compress_order.core.schema import SIMULATED
from compress_order.evaluation.metrics import METRICS

COSTS = ("size_bytes", "avg_bits", "latency_ms")
PANEL = ["model", "dataset"]  # metrics compare only within one model on one dataset
NODE = [*TABLE_INDEX, "order"]
# decimal and binary byte units, matched case-insensitively
SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)
# a stage kind → the settings that shape it (a custom label of unknown kind may use both)
USES = {"bits": {"quantize", "joint", ""}, "sparsity": {"prune", "joint", ""}, "group_size": {"quantize", "joint", ""}}


def parse_size(text: str) -> float:
    """Bytes in `500MB`, `1.2GB`, `800kB`, `2GiB` or `123456` (kB, MB, GB, TB: powers of 1000; KiB, MiB, GiB,
    TiB: powers of 1024); a UserError naming the valid units otherwise."""
    m = _SIZE.fullmatch(str(text))
    units = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if m is None:
        raise UserError(f"size '{text}' is not a number with an optional unit (e.g. 1.2GB); valid units: {units}")
    number, unit = float(m.group(1)), m.group(2).lower() or "b"
    if unit not in SIZE_UNITS:
        raise UserError(f"size '{text}': unknown unit '{m.group(2)}'; valid units: {units}")
    return number * SIZE_UNITS[unit]


def format_size(n: float) -> str:
    """Bytes in decimal units, 3 significant digits."""
    for unit in ("TB", "GB", "MB", "kB"):
        if abs(n) >= SIZE_UNITS[unit.lower()]:
            return f"{n / SIZE_UNITS[unit.lower()]:.3g} {unit}"
    return f"{n:.0f} B"


# --- the points -------------------------------------------------------------------------------------------------


def pattern(order: str, stages: str, depth: int) -> str:
    """The kind of a node, to colour and compare across stage lists: dense, single, joint, or its order of kinds
    (`prune > quantize`)."""
    labels = stages.split(",")
    if order == "dense":
        return "dense"
    if any(lab not in labels for lab in order.split(" > ")):
        return "joint"
    if depth == 1:
        return "single"
    return order_pattern(order, stages)


def _uses(order: str, setting: str) -> bool:
    return order != "dense" and any(stage_kind(lab) in USES[setting] for lab in order.split(" > "))


def _pooled(df: pd.DataFrame, metric: str, backend: str) -> pd.Series:
    """Mean over seeds of `metric` per node. A metric that several backends measure (latency) is read from
    `backend`; the others come from whatever backend wrote them."""
    rows = df[(df["status"] == "ok") & (df["metric"] == metric)]
    if (rows["backend"] == backend).any():
        rows = rows[rows["backend"] == backend]
    rows = rows.drop_duplicates([*NODE, "seed"])
    return rows.groupby(NODE, dropna=False, sort=False)["value"].mean().rename(metric)


def _keys(node_keys: pd.Series) -> tuple[str, ...] | None:
    """A node's identity over seeds: its node_keys (one per seed for a calibrated node); None where unknown."""
    return tuple(sorted(map(str, node_keys.unique()))) if node_keys.notna().all() else None


def resolve_backend(df: pd.DataFrame, backend: str) -> str:
    """The backend rows named `backend`: its exact name, or the one row name whose part before the dtype in
    parentheses it is (`int4_weight_only` → `int4_weight_only(bf16)`); a UserError naming the backends present."""
    present = set(df.loc[df["status"] == "ok", "backend"].dropna().astype(str))
    if backend in present:
        return backend
    found = sorted(b for b in present if b.split("(", 1)[0] == backend)
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"--backend {backend} is ambiguous: {choices(found)}; name one with its dtype")
    raise UserError(f"--backend {backend}: no successful rows of it; backends present: {choices(present)}")


def nodes(df: pd.DataFrame, metric: str, backend: str = SIMULATED) -> pd.DataFrame:
    """One row per distinct node and panel: its settings, pattern, `value` (metric, mean over seeds), `score`
    (value oriented so larger is better), the costs present, `n_seeds`, and `keys` (its node_keys, one per seed
    for a calibrated node)."""
    backend = resolve_backend(df, backend)
    rows = node_values(df, metric)
    if (rows["backend"] == backend).any():
        rows = rows[rows["backend"] == backend]
    rows = rows.drop_duplicates([*NODE, "seed"])
    g = rows.groupby(NODE, dropna=False, sort=False)
    out = g.agg(
        value=("value", "mean"),
        depth=("depth", "first"),
        n_seeds=("seed", "nunique"),
        rank=("rank", "min"),
        keys=("node_key", _keys),
    )
    for cost in COSTS:
        out = out.join(_pooled(df, cost, backend))
    out = keyed_like(out.reset_index(), rows)
    out = out.reindex(columns=[*NODE, "value", "depth", "n_seeds", "rank", "keys", *COSTS])
    out["keys"] = [k if k is not None else tuple(map(str, r)) for k, r in zip(out["keys"], out[NODE].to_numpy())]
    out = out.sort_values("rank").drop_duplicates([*PANEL, "keys"]).drop(columns="rank")
    out["pattern"] = [pattern(o, s, d) for o, s, d in zip(out["order"], out["stages"], out["depth"])]
    out["score"] = direction(df, metric) * out["value"]
    return out.reset_index(drop=True)


def shown(points: pd.DataFrame) -> pd.DataFrame:
    """`points` with each setting blanked where no stage of the node uses it (dense has no bits; one stage alone
    stands for every setting of the sweep that shares it)."""
    out = points.copy()
    for setting in USES:
        out[setting] = out[setting].where([_uses(o, setting) for o in out["order"]])
    return out


# --- the frontier -----------------------------------------------------------------------------------------------


def pareto_mask(cost: Sequence[float], score: Sequence[float]) -> np.ndarray:
    """True for points no other point dominates: none has cost ≤ and score ≥, with one of the two strict.
    Points tied in both are all kept; NaN points are never on the frontier."""
    cost, score = np.asarray(cost, float), np.asarray(score, float)
    mask = np.zeros(len(cost), bool)
    ok = np.flatnonzero(~(np.isnan(cost) | np.isnan(score)))
    best_before = -np.inf  # best score at strictly lower cost
    for c in np.unique(cost[ok]):  # ascending
        same = ok[cost[ok] == c]
        top = score[same].max()
        mask[same] = (score[same] == top) & (top > best_before)
        best_before = max(best_before, top)
    return mask


def frontier(points: pd.DataFrame, x: str) -> pd.DataFrame:
    """`points` with `frontier` (per panel), sorted by panel and `x`; points without `x` are dropped."""
    if x not in points.columns or points[x].isna().all():
        raise UserError(f"no successful '{x}' rows to put on the x axis; valid: {', '.join(COSTS)}")
    pts = points.dropna(subset=[x]).copy()
    pts["frontier"] = False
    for _, g in pts.groupby(PANEL, dropna=False, sort=False):
        pts.loc[g.index, "frontier"] = pareto_mask(g[x], g["score"])
    return pts.sort_values([*PANEL, x, "score"], ascending=[True, True, True, False]).reset_index(drop=True)


def frontier_table(pts: pd.DataFrame, x: str, metric: str, higher_is_better: bool) -> tuple[pd.DataFrame, str]:
    """The frontier points as a table (model/dataset only when several) and its caption."""
    front = shown(pts[pts["frontier"]]).rename(columns={"value": metric})
    cols = [c for c in PANEL if pts[c].nunique(dropna=False) > 1]
    cols += [x, metric, "order", "pattern", "stages", "bits", "sparsity", "group_size"]
    cols += ["act_bits"] if "act_bits" in pts.columns and pts["act_bits"].notna().any() else []
    cols += [c for c in ("size_bytes", "avg_bits") if c != x and front[c].notna().any()]  # what the node costs
    if pts["n_seeds"].max() > 1:
        cols.append("n_seeds")
    table = front[cols].copy()
    if "size_bytes" in table.columns:
        table["size_bytes"] = table["size_bytes"].round().astype("Int64")
    for setting in USES:  # blank, not "nan", where a setting does not apply
        table[setting] = [f"{v:g}" if pd.notna(v) else "" for v in table[setting]]
    arrow = "↑" if higher_is_better else "↓"
    seeds = "; values are means over seeds" if pts["n_seeds"].max() > 1 else ""
    caption = (
        f"Pareto frontier of {metric} ({arrow} better) against {x}: {len(front)} of {len(pts)} distinct nodes "
        f"are not dominated (no other node has ≤ {x} and a better-or-equal {metric}){seeds}"
    )
    return table, caption


# --- budgets ----------------------------------------------------------------------------------------------------


def within(points: pd.DataFrame, budgets: dict[str, float]) -> pd.DataFrame:
    """Points whose every budgeted cost is known and ≤ its budget, best first (ties: smaller, then fewer bits)."""
    ok = pd.Series(True, index=points.index)
    for cost, limit in budgets.items():
        ok &= points[cost].le(limit)
    return points[ok].sort_values(["score", "size_bytes", "avg_bits"], ascending=[False, True, True])


def paired_difference(
    df: pd.DataFrame, a: pd.Series, b: pd.Series, metric: str, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float] | None:
    """How much better node `a` is than node `b` (positive: a is better), with its 95% interval, paired over the
    evaluation units of each seed (and pooled over seeds like the order differences): (diff, low, high), or None
    when no pair of their runs has per-unit samples of both on the same units.

    Two nodes share units when one run folder evaluated both, or when their run folders share a node: a node_key
    includes the model, data and evaluation configs, so such runs evaluated the same windows (the jobs of a sweep
    share the dense node)."""
    m = METRICS.get(metric)
    if m is None or m.unit_sample is None or n_boot <= 0 or "path" not in df.columns:
        return None
    rows = node_values(df, metric)
    rows = rows[rows["node_key"].notna()]
    keys_of = rows.groupby("path")["node_key"].agg(set)
    data = []
    for _, g in rows.groupby("seed", dropna=False, sort=True):
        ra, rb = g[g["node_key"].isin(a["keys"])], g[g["node_key"].isin(b["keys"])]
        pairs = [
            (x, y)
            for x in ra.itertuples()
            for y in rb.itertuples()
            if x.path == y.path or keys_of[x.path] & keys_of[y.path]
        ]
        if not pairs:
            continue
        pairs.sort(key=lambda xy: xy[0].path != xy[1].path)  # one run folder first
        ua, ub = (bootstrap.node_units(pd.Series(r._asdict()), m) for r in pairs[0])
        if ua is None or ub is None:
            continue
        both = pd.concat([ua, ub], axis=1, join="inner").to_numpy(float)  # the same units of one evaluation
        if len(both) >= 2:
            data.append((both[:, 0], both[:, 1]))
    if not data:
        return None
    stat, rng, d = bootstrap._difference(m), np.random.default_rng(seed), direction(df, metric)
    if len(data) == 1:
        lo, hi, _ = bootstrap.window_interval(data[0], stat, n_boot, rng)
    else:
        lo, hi, _ = bootstrap.seed_interval(data, stat, n_boot, rng)
    lo, hi = sorted((d * lo, d * hi))
    return d * float(np.mean([stat(*x) for x in data])) + 0.0, lo + 0.0, hi + 0.0  # + 0.0: no "-0"


def smallest(points: pd.DataFrame) -> pd.Series:
    return points.sort_values(["size_bytes", "avg_bits", "score"], ascending=[True, True, False]).iloc[0]


def overlap(a: pd.Series, b: pd.Series) -> bool | None:
    """Whether two nodes' intervals overlap; None when either has none."""
    if any(pd.isna(v) for v in (a["low"], a["high"], b["low"], b["high"])):
        return None
    return bool(a["low"] <= b["high"] and b["low"] <= a["high"])


def describe_node(r: pd.Series, metric: str, latency: bool = False) -> str:
    """`order [pattern] bits=.. sparsity=..: metric value [low, high], size, bits/weight[, ms]`."""
    r = shown(r.to_frame().T).iloc[0]
    settings = " ".join(f"{k}={r[k]:g}" for k in USES if pd.notna(r[k]))
    ci = f" [{r['low']:.4g}, {r['high']:.4g}]" if pd.notna(r.get("low")) else ""
    costs = [
        format_size(r["size_bytes"]) if pd.notna(r["size_bytes"]) else "",
        f"{r['avg_bits']:.3g} bits/weight" if pd.notna(r["avg_bits"]) else "",
        f"{r['latency_ms']:.3g} ms" if latency and pd.notna(r["latency_ms"]) else "",
    ]
    head = f"{r['order']} [{r['pattern']}, stages {r['stages']}]" + (f" {settings}" if settings else "")
    return f"{head}: {metric} {r['value']:.4g}{ci}; " + ", ".join(c for c in costs if c)


def budget_text(budgets: dict[str, float]) -> str:
    return ", ".join(f"{c} ≤ {format_size(v) if c == 'size_bytes' else format(v, 'g')}" for c, v in budgets.items())


# --- the order map ----------------------------------------------------------------------------------------------

MAP_PANEL = ["model", "dataset", "stages", "group_size", "act_bits"]
MAP_COLUMNS = [
    *MAP_PANEL,
    "bits",
    "sparsity",
    "f1",
    "f2",
    "winner",
    "A",
    "A_low",
    "A_high",
    "significant",
    "predicted",
    "agree",
    "n_seeds",
]


def order_map_cells(settings: pd.DataFrame) -> pd.DataFrame:
    """One cell per (stage pair, bits, sparsity) from the per-setting analysis (pih.analyze with A's interval):
    the winning order (`tie` when A = 0), A (positive: f1 first is better) and its interval, `significant`
    (None without samples), and the order the PIH predicts from the stages alone, with `agree`."""
    pts = settings.dropna(subset=["A"])
    if pts.empty:
        return pd.DataFrame(columns=MAP_COLUMNS)
    cells = pts.assign(
        winner=[
            f"{a} > {b}" if v > 0 else f"{b} > {a}" if v < 0 else "tie"
            for a, b, v in zip(pts["f1"], pts["f2"], pts["A"])
        ],
        significant=pts.get("A_significant", pd.Series(None, index=pts.index)),
        A_low=pts.get("A_low", np.nan),
        A_high=pts.get("A_high", np.nan),
    )
    return cells.reindex(columns=MAP_COLUMNS).reset_index(drop=True)
