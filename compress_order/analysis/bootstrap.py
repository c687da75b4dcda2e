"""Confidence intervals from the per-unit samples every run stores (samples.parquet beside results.parquet).

Two orders of one run are evaluated on the same units (LM windows or images), so their difference is
bootstrapped *paired*: each resample draws units with replacement and recomputes both orders' metric from the
same draw (perplexity = exp(mean nll), top1 = 100·mean(correct), nll = mean nll). The percentile interval of
the difference is reported; a difference whose interval covers zero is not significant. Repeated calibration
seeds are summarised separately as mean ± sd over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from compress_order.analysis.collect import read_parquet
from compress_order.analysis.tables import SETTING, direction, node_values

SAMPLES = "samples.parquet"
# metric → (per-unit sample metric, function of the mean over units that gives the metric)
FROM_MEAN: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "perplexity": ("nll", np.exp),
    "nll": ("nll", lambda m: m),
    "top1": ("correct", lambda m: 100.0 * m),
}
CHUNK = 4_000_000  # resampled values held in memory at once (ImageNet has 50k units per node)


def _draws(n: int, n_boot: int, seed: int):
    """Index matrices (k, n) of units drawn with replacement, n_boot rows in all, in memory-sized chunks."""
    rng = np.random.default_rng(seed)
    per = max(1, CHUNK // max(n, 1))
    for start in range(0, n_boot, per):
        yield rng.integers(0, n, size=(min(per, n_boot - start), n))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, metric: str, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:  # fmt: skip
    """Metric(a) − metric(b) over paired units, with its percentile CI: (estimate, low, high)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples need equal, non-empty shapes, got {a.shape} and {b.shape}")
    f = FROM_MEAN[metric][1]
    diffs = np.concatenate([f(a[i].mean(1)) - f(b[i].mean(1)) for i in _draws(a.size, n_boot, seed)])
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(f(a.mean()) - f(b.mean())), float(lo), float(hi)


def bootstrap_ci(x: np.ndarray, metric: str, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:  # fmt: skip
    """Metric of one node with its percentile CI: (estimate, low, high)."""
    x = np.asarray(x, float)
    f = FROM_MEAN[metric][1]
    stats = np.concatenate([f(x[i].mean(1)) for i in _draws(x.size, n_boot, seed)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(f(x.mean())), float(lo), float(hi)


@lru_cache(maxsize=64)
def load_samples(run_dir: str) -> pd.DataFrame | None:
    """A run's per-unit samples; None when it has none or its file is unreadable (warned and recorded)."""
    p = Path(run_dir) / SAMPLES
    return read_parquet(p) if p.is_file() else None


def units(run_dir: str, node_key: str, sample_metric: str) -> pd.Series | None:
    """Per-unit values of one node, indexed by unit; None when the run stored none."""
    s = load_samples(run_dir)
    if s is None:
        return None
    sel = s[(s["node_key"] == node_key) & (s["metric"] == sample_metric)]
    return None if sel.empty else sel.set_index("unit")["value"]


def order_differences(df: pd.DataFrame, metric: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every pair of full orders of every setting: diff = how much better a is than b (in the metric's
    direction, so positive means a is better), its paired-bootstrap CI and whether it is significant."""
    nodes = node_values(df, metric)
    if metric not in FROM_MEAN or "path" not in nodes.columns:
        return pd.DataFrame(columns=[*SETTING, "order_a", "order_b", "diff", "low", "high", "significant"])
    d = direction(df, metric)
    sample_metric = FROM_MEAN[metric][0]
    full = nodes[nodes["role"] == "full"]  # sequential orders and any joint one-pass node
    rows = []
    for key, g in full.groupby(SETTING, dropna=False, sort=False):
        g = g.drop_duplicates("order")  # one run per setting (a re-collected run repeats its rows)
        for (_, a), (_, b) in combinations(g.iterrows(), 2):
            ua, ub = units(a["path"], a["node_key"], sample_metric), units(b["path"], b["node_key"], sample_metric)
            if ua is None or ub is None or a["path"] != b["path"]:
                continue
            both = pd.concat([ua, ub], axis=1, join="inner").to_numpy()  # paired: the same units
            est, lo, hi = paired_bootstrap(both[:, 0], both[:, 1], metric, n_boot, seed)
            lo, hi = sorted((d * lo + 0.0, d * hi + 0.0))  # + 0.0: no "-0" in reports
            rows.append({**dict(zip(SETTING, key)), "order_a": a["order"], "order_b": b["order"], "diff": d * est + 0.0,
                         "low": lo, "high": hi, "significant": not lo <= 0 <= hi, "n_units": len(both)})  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=[*SETTING, "order_a", "order_b", "diff", "low", "high",
                                               "significant", "n_units"])  # fmt: skip


def node_intervals(df: pd.DataFrame, metric: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every full order's metric with a bootstrap CI (`low`, `high`; NaN without samples), for error bars."""
    nodes = node_values(df, metric)
    nodes = nodes[nodes["role"] == "full"].drop_duplicates([*SETTING, "order"]).copy()
    nodes["low"] = nodes["high"] = math.nan
    if metric in FROM_MEAN and "path" in nodes.columns and n_boot > 0:
        for i, row in nodes.iterrows():
            u = units(row["path"], row["node_key"], FROM_MEAN[metric][0])
            if u is not None:
                _, nodes.loc[i, "low"], nodes.loc[i, "high"] = bootstrap_ci(u.to_numpy(), metric, n_boot, seed)
    return nodes


def attach_a_interval(settings: pd.DataFrame, diffs: pd.DataFrame) -> pd.DataFrame:
    """Add A's CI (A_low, A_high, A_significant) to 2-stage settings: the pair `f1 > f2` vs `f2 > f1`."""
    if diffs.empty:
        return settings.assign(A_low=math.nan, A_high=math.nan, A_significant=None)
    fwd = diffs[[*SETTING, "order_a", "order_b", "low", "high", "significant"]]
    # The same pair the other way round: the difference and its interval change sign.
    rev = fwd.assign(low=-fwd["high"], high=-fwd["low"]).rename(columns={"order_a": "order_b", "order_b": "order_a"})
    ci = pd.concat([fwd, rev]).rename(columns={"low": "A_low", "high": "A_high", "significant": "A_significant"})
    keyed = settings.assign(order_a=settings["f1"] + " > " + settings["f2"],
                            order_b=settings["f2"] + " > " + settings["f1"])  # fmt: skip
    out = keyed.merge(ci, on=[*SETTING, "order_a", "order_b"], how="left")
    return out.drop(columns=["order_a", "order_b"])


def seed_summary(frame: pd.DataFrame, values: list[str], by: list[str] | None = None) -> pd.DataFrame:
    """Mean, sd and count over seeds of `values` columns, per setting without the seed (or `by`)."""
    by = by or [c for c in SETTING if c != "seed"]
    grouped = frame.groupby(by, dropna=False, sort=False)[values]
    out = grouped.agg(["mean", "std", "count"])
    out.columns = [f"{v}_{stat}" for v, stat in out.columns]
    out["n_seeds"] = frame.groupby(by, dropna=False, sort=False)["seed"].nunique()
    return out.reset_index()


def mean_sd(mean: float, sd: float, fmt: str = ".4g") -> str:
    """'mean ± sd' (just the mean when sd is undefined, as with a single seed)."""
    if pd.isna(mean):
        return ""
    return format(mean, fmt) if pd.isna(sd) else f"{format(mean, fmt)} ± {format(sd, fmt)}"
