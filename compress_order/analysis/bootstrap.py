"""Confidence intervals from the per-unit samples every run stores (samples.parquet beside results.parquet).

What a metric is in terms of its units comes from the metric registry: `Metric.unit_sample` names the per-unit
sample and `Metric.from_mean` turns a mean over units into the metric (perplexity = exp(mean window nll),
top1 = 100·mean(correct), nll = mean nll, an lm-eval score = mean per-document score).

Two sources of noise move a comparison of orders:

* **evaluation windows** (units): the test set is a sample. Two orders of one seed are evaluated on the same
  units, so their difference is bootstrapped *paired* (scipy.stats.bootstrap, paired=True): BCa, or the
  percentile interval where BCa is degenerate (e.g. constant samples).
* **calibration seeds**: Wanda, SparseGPT and GPTQ see a random calibration draw, so each compressed model is
  itself a sample. With several seeds the interval is a two-level bootstrap — draw seeds with replacement, then
  units paired within each drawn seed; the statistic is the mean over drawn seeds of the per-seed difference.
  A seed bootstrap from 2-3 seeds cannot see the spread it has not sampled (3 seeds allow 10 distinct draws), so
  a Student-t interval over the per-seed differences is computed as a cross-check and the reported interval is
  the union of the two: the more conservative reading, which decides "significant" only when both exclude zero.
  With a single seed the interval covers evaluation noise only, and the `noise` column says so whenever a
  seed-dependent (calibrated) stage is in the comparison.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from compress_order.analysis.collect import read_parquet
from compress_order.analysis.tables import TABLE_INDEX, direction, keyed_like, node_values, seed_dependent
from compress_order.core.schema import SAMPLES
from compress_order.evaluation.metrics import METRICS, Metric

CHUNK = 4_000_000  # resampled values held in memory at once (ImageNet has 50k units per node)
# BCa's jackknife costs units² operations (77 s for 50k units); beyond this many units the percentile interval is
# used, where the bootstrap distribution of a mean over thousands of units is close to normal and BCa's bias and
# skew corrections are negligible.
BCA_MAX_UNITS = 5_000
LEVEL = 0.95
GROUP = TABLE_INDEX  # a comparison pools the seeds of one setting
# `noise`: what an interval covers
SEEDS_AND_WINDOWS = "seeds+windows"
WINDOWS_ONLY = "windows only"  # one seed of a seed-dependent comparison: calibration noise is not covered
SEED_FREE = "windows (seed-free)"  # data-free stages: there is no calibration noise to cover
DIFF_COLUMNS = [
    *GROUP,
    "order_a",
    "order_b",
    "diff",
    "low",
    "high",
    "significant",
    "noise",
    "n_seeds",
    "seed_sd",
    "n_units",
    "method",
]

Statistic = Callable[..., np.ndarray]


def _metric(metric: str) -> Metric:
    return METRICS[metric]


def _difference(m: Metric) -> Statistic:
    return lambda a, b, axis=-1: m.from_mean(a.mean(axis)) - m.from_mean(b.mean(axis))


def _value(m: Metric) -> Statistic:
    return lambda x, axis=-1: m.from_mean(x.mean(axis))


def _batch(n: int) -> int:
    return max(1, CHUNK // max(n, 1))


def window_interval(
    data: Sequence[np.ndarray], statistic: Statistic, n_boot: int, rng: np.random.Generator, level: float = LEVEL
) -> tuple[float, float, str]:
    """scipy's BCa interval of `statistic` over paired units, percentile where BCa is degenerate or the units too
    many (BCA_MAX_UNITS): (low, high, method). Constant resampled statistics (identical orders) give the point."""
    kw = dict(paired=True, vectorized=True, n_resamples=n_boot, confidence_level=level, batch=_batch(data[0].size))
    methods = ("BCa", "percentile") if data[0].size <= BCA_MAX_UNITS else ("percentile",)
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)  # BCa's z-scores of a constant distribution
            ci = stats.bootstrap(tuple(data), statistic, method=method, rng=rng, **kw).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            return float(ci.low), float(ci.high), method
    point = float(statistic(*data))
    return point, point, "constant"


def seed_interval(
    per_seed: Sequence[Sequence[np.ndarray]],
    statistic: Statistic,
    n_boot: int,
    rng: np.random.Generator,
    level: float = LEVEL,
) -> tuple[float, float, str]:
    """Interval of the mean over seeds of `statistic`: the union of a two-level bootstrap (seeds, then paired
    units within each drawn seed) and a t-interval over the per-seed values. (low, high, method)."""
    k = len(per_seed)
    draws = rng.integers(0, k, size=(n_boot, k))
    replicates = np.empty((n_boot, k))
    for s, data in enumerate(per_seed):
        hits = draws == s
        if not hits.any():
            continue
        res = stats.bootstrap(
            tuple(data),
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=int(hits.sum()),
            method="percentile",
            batch=_batch(data[0].size),
            rng=rng,
        )
        replicates[hits] = res.bootstrap_distribution  # one independent unit resample per drawn seed
    boot_lo, boot_hi = np.quantile(replicates.mean(1), [(1 - level) / 2, (1 + level) / 2])
    per = np.array([float(statistic(*data)) for data in per_seed])
    sd = per.std(ddof=1)
    t_lo, t_hi = (per.mean(), per.mean()) if sd == 0 else stats.t.interval(level, k - 1, per.mean(), sd / math.sqrt(k))
    if boot_lo <= t_lo and boot_hi >= t_hi:
        method = "seed bootstrap"
    elif t_lo <= boot_lo and t_hi >= boot_hi:
        method = "t over seeds"
    else:
        method = "seed bootstrap ∪ t"
    return float(min(boot_lo, t_lo)), float(max(boot_hi, t_hi)), method


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, metric: str, n_boot: int = 1000, seed: int = 0, level: float = LEVEL
) -> tuple[float, float, float]:
    """Metric(a) − metric(b) over paired units, with its window-bootstrap CI: (estimate, low, high)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples need equal, non-empty shapes, got {a.shape} and {b.shape}")
    stat = _difference(_metric(metric))
    lo, hi, _ = window_interval((a, b), stat, n_boot, np.random.default_rng(seed), level)
    return float(stat(a, b)), lo, hi


def bootstrap_ci(
    x: np.ndarray, metric: str, n_boot: int = 1000, seed: int = 0, level: float = LEVEL
) -> tuple[float, float, float]:
    """Metric of one node with its window-bootstrap CI: (estimate, low, high)."""
    x = np.asarray(x, float)
    stat = _value(_metric(metric))
    lo, hi, _ = window_interval((x,), stat, n_boot, np.random.default_rng(seed), level)
    return float(stat(x)), lo, hi


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


@lru_cache(maxsize=None)
def _warn_mismatch(metric: str, sample: str) -> None:
    print(
        f"compress-order: warning: {metric} is not the registered reduction of its per-unit '{sample}' samples; "
        f"no intervals for it",
        file=sys.stderr,
    )


def node_units(row: pd.Series, m: Metric) -> pd.Series | None:
    """A node's units, checked against its stored value: samples that do not reproduce it (a metric lm-eval
    aggregates otherwise than by the mean) give no interval rather than a wrong one."""
    if m.unit_sample is None or not isinstance(row.get("path"), str):
        return None
    u = units(row["path"], row["node_key"], m.unit_sample)
    if u is None:
        return None
    if not np.isclose(float(m.from_mean(u.mean())), float(row["value"]), rtol=1e-6, atol=1e-9):
        _warn_mismatch(m.name, m.unit_sample)
        return None
    return u


def noise_of(n_seeds: int, orders: Sequence[str]) -> str:
    """What an interval over `n_seeds` seeds of these orders covers."""
    if n_seeds > 1:
        return SEEDS_AND_WINDOWS
    return WINDOWS_ONLY if any(seed_dependent(o) for o in orders) else SEED_FREE


def _one_per_seed(g: pd.DataFrame) -> dict[object, pd.DataFrame]:
    """Nodes of a setting per seed, one row per order (a re-collected run repeats its rows)."""
    return {s: n.drop_duplicates("order").set_index("order") for s, n in g.groupby("seed", dropna=False, sort=True)}


def order_differences(df: pd.DataFrame, metric: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every pair of full orders of every setting, pooled over its calibration seeds: diff = mean over seeds of
    how much better a is than b (in the metric's direction, so positive means a is better), its interval
    (windows, and seeds when there are several), `significant` when the interval excludes zero, and `noise`."""
    nodes = node_values(df, metric)
    m = _metric(metric) if metric in METRICS else None
    if m is None or m.unit_sample is None or "path" not in nodes.columns or n_boot <= 0:
        return pd.DataFrame(columns=DIFF_COLUMNS)
    d = direction(df, metric)
    rng = np.random.default_rng(seed)
    stat = _difference(m)
    full = nodes[nodes["role"] == "full"]  # sequential orders and any joint one-pass node
    rows = []
    for key, g in full.groupby(GROUP, dropna=False, sort=False):
        per_seed = _one_per_seed(g)
        orders = list(dict.fromkeys(g["order"]))
        for a, b in combinations(orders, 2):
            data = []
            for nodes_s in per_seed.values():
                if a not in nodes_s.index or b not in nodes_s.index or nodes_s.at[a, "path"] != nodes_s.at[b, "path"]:
                    continue
                ua, ub = node_units(nodes_s.loc[a], m), node_units(nodes_s.loc[b], m)
                if ua is None or ub is None:
                    continue
                both = pd.concat([ua, ub], axis=1, join="inner").to_numpy(float)  # paired: the same units
                if len(both) >= 2:  # one unit has no spread to resample
                    data.append((both[:, 0], both[:, 1]))
            if not data:
                continue
            per = np.array([float(stat(*x)) for x in data])
            if len(data) == 1:
                lo, hi, method = window_interval(data[0], stat, n_boot, rng)
            else:
                lo, hi, method = seed_interval(data, stat, n_boot, rng)
            lo, hi = sorted((d * lo + 0.0, d * hi + 0.0))  # + 0.0: no "-0" in reports
            rows.append(
                {
                    **dict(zip(GROUP, key)),
                    "order_a": a,
                    "order_b": b,
                    "diff": d * per.mean() + 0.0,
                    "low": lo,
                    "high": hi,
                    "significant": not lo <= 0 <= hi,
                    "noise": noise_of(len(data), (a, b)),
                    "n_seeds": len(data),
                    "seed_sd": per.std(ddof=1) if len(per) > 1 else math.nan,
                    "n_units": min(len(x[0]) for x in data),
                    "method": method,
                }
            )
    return keyed_like(pd.DataFrame(rows, columns=DIFF_COLUMNS), df)


def node_intervals(
    df: pd.DataFrame, metric: str, n_boot: int = 1000, seed: int = 0, roles: Sequence[str] = ("full",)
) -> pd.DataFrame:
    """Every full order's metric (or every node of `roles`: dense, single, partial, full), mean over seeds, with
    its interval (`low`, `high`; NaN without samples) over windows and seeds, for error bars."""
    nodes = node_values(df, metric)
    full = nodes[nodes["role"].isin(roles)]
    m = METRICS.get(metric)
    rng = np.random.default_rng(seed)
    rows = []
    for key, g in full.groupby([*GROUP, "order"], dropna=False, sort=False):
        g = g.drop_duplicates("seed")
        row = {
            **dict(zip([*GROUP, "order"], key)),
            "value": g["value"].mean(),
            "n_seeds": len(g),
            "low": math.nan,
            "high": math.nan,
        }
        usable = m is not None and n_boot > 0 and "path" in g.columns
        found = [node_units(r, m) for _, r in g.iterrows()] if usable else []
        if found and all(u is not None and len(u) >= 2 for u in found):
            x = [(u.to_numpy(float),) for u in found]
            if len(x) == 1:
                row["low"], row["high"], _ = window_interval(x[0], _value(m), n_boot, rng)
            else:
                row["low"], row["high"], _ = seed_interval(x, _value(m), n_boot, rng)
        rows.append(row)
    return keyed_like(pd.DataFrame(rows, columns=[*GROUP, "order", "value", "n_seeds", "low", "high"]), df)


def attach_a_interval(settings: pd.DataFrame, diffs: pd.DataFrame) -> pd.DataFrame:
    """Add A's interval (A_low, A_high, A_significant, A_noise) to 2-stage settings: the pair `f1 > f2` vs
    `f2 > f1` of the same setting, pooled over seeds like the settings themselves."""
    cols = ["A_low", "A_high", "A_significant", "A_noise"]
    if diffs.empty:
        return settings.assign(A_low=math.nan, A_high=math.nan, A_significant=None, A_noise=None)
    fwd = diffs[[*GROUP, "order_a", "order_b", "low", "high", "significant", "noise"]]
    # The same pair the other way round: the difference and its interval change sign.
    rev = fwd.assign(low=-fwd["high"], high=-fwd["low"]).rename(columns={"order_a": "order_b", "order_b": "order_a"})
    ci = pd.concat([fwd, rev]).rename(columns=dict(zip(["low", "high", "significant", "noise"], cols)))
    f1, f2 = settings["f1"].astype(str), settings["f2"].astype(str)  # NaN for 3+ stages: matches no pair
    keyed = settings.drop(columns=[c for c in cols if c in settings.columns]).assign(
        order_a=f1 + " > " + f2, order_b=f2 + " > " + f1
    )
    out = keyed.merge(ci, on=[*GROUP, "order_a", "order_b"], how="left")
    return out.drop(columns=["order_a", "order_b"])


def seed_summary(frame: pd.DataFrame, values: list[str], by: list[str] | None = None) -> pd.DataFrame:
    """Mean, sd and count over seeds of `values` columns, per setting without the seed (or `by`)."""
    by = by or GROUP
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
