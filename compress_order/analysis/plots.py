"""Figures of an analysis, each saved as PNG and PDF: A vs G with its trend (the paper's Figures 3/4/6),
metric per order as grouped bars with bootstrap CIs, and a bits × sparsity heatmap of A."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from compress_order.analysis.pih import rank_correlation, trend  # noqa: E402
from compress_order.analysis.tables import order_pattern  # noqa: E402


def save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def a_vs_g(settings: pd.DataFrame, out_dir: Path, metric: str) -> list[Path]:
    """Order advantage A against performance gap G, one colour per stage pair, least-squares trend line."""
    pts = settings.dropna(subset=["A", "G"])
    if pts.empty:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for pair, g in pts.groupby("stages", sort=False):
        yerr = None
        if {"A_low", "A_high"} <= set(g.columns) and g["A_low"].notna().any():
            yerr = np.vstack([g["A"] - g["A_low"], g["A_high"] - g["A"]]).clip(min=0)
        ax.errorbar(g["G"], g["A"], yerr=yerr, fmt="o", capsize=2, label=pair.replace(",", " / "))
    if len(pts) >= 2 and pts["G"].nunique() >= 2:
        slope, intercept = trend(pts["G"], pts["A"])
        xs = np.linspace(pts["G"].min(), pts["G"].max(), 50)
        ax.plot(xs, slope * xs + intercept, "k--", lw=1, label=f"trend (slope {slope:.3g})")
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    rho, _, n = rank_correlation(pts)
    ax.set_title(f"A vs G ({metric}); Spearman ρ = {rho:.2f}, n = {n}")
    ax.set_xlabel("G = I(f2) − I(f1)   (f2 stronger →)")
    ax.set_ylabel("A(f1→f2)   (f1 first better ↑)")
    ax.legend(fontsize=7)
    return save(fig, out_dir, "a_vs_g")


def order_bars(intervals: pd.DataFrame, out_dir: Path, metric: str) -> list[Path]:
    """Metric of every full order, grouped by setting, with bootstrap CI error bars where samples exist."""
    if intervals.empty:
        return []
    df = intervals.assign(
        setting=[
            f"{m}\n{s}\nb{b} s{sp:g}"
            for m, s, b, sp in zip(intervals["model"], intervals["stages"], intervals["bits"], intervals["sparsity"])
        ],
        column=[order_pattern(o, s) for o, s in zip(intervals["order"], intervals["stages"])],
    )
    wide = df.pivot_table(
        index="setting", columns="column", values=["value", "low", "high"], aggfunc="mean", sort=False, dropna=False
    )
    settings, orders = wide.index.tolist(), df["column"].drop_duplicates().tolist()
    width = 0.8 / len(orders)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(settings) * len(orders) ** 0.5), 4.2))
    x = np.arange(len(settings))
    for k, order in enumerate(orders):
        v = wide["value"][order].to_numpy(float)
        err = np.vstack([v - wide["low"][order].to_numpy(float), wide["high"][order].to_numpy(float) - v])
        err = None if np.isnan(err).all() else np.nan_to_num(err).clip(min=0)
        ax.bar(x + (k - (len(orders) - 1) / 2) * width, v, width, yerr=err, capsize=2, label=order)
    ax.set_xticks(x, settings, fontsize=6)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per order (95% CI over windows, and seeds where several)")
    ax.legend(fontsize=7)
    return save(fig, out_dir, "order_bars")


def a_heatmap(settings: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Mean A over seeds on a bits × sparsity grid, one panel per (model, stage pair); red = f1 first better."""
    pts = settings.dropna(subset=["A"])
    if pts.empty:
        return []
    panels = list(pts.groupby(["model", "stages"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    vmax = float(pts["A"].abs().max()) or 1.0
    for ax, ((model, pair), g) in zip(axes[0], panels):
        grid = g.pivot_table(index="bits", columns="sparsity", values="A", aggfunc="mean")
        im = ax.imshow(grid.to_numpy(float), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[1]), [f"{s:g}" for s in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{b:g}" for b in grid.index])
        for (i, j), a in np.ndenumerate(grid.to_numpy(float)):
            if not np.isnan(a):
                ax.text(
                    j,
                    i,
                    f"{a:.3g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(a) > 0.6 * vmax else "black",
                )
        ax.set_xlabel("sparsity")
        ax.set_ylabel("bits")
        ax.set_title(f"{model}: A({pair.replace(',', '→')})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save(fig, out_dir, "a_heatmap")


PATTERN_COLOURS = {"dense": "black", "single": "tab:grey", "joint": "tab:purple"}


def frontier(points: pd.DataFrame, x: str, metric: str, out_dir: Path) -> list[Path]:
    """Every node as a point coloured by its pattern (dense, single, joint, prune > quantize, …), the Pareto
    frontier as a step line, the dense model as a star; one panel per (model, dataset)."""
    panels = list(points.groupby(["model", "dataset"], sort=False))
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    colours = {p: PATTERN_COLOURS.get(p) or next(cycle) for p in points["pattern"].drop_duplicates()}
    for ax, ((model, dataset), g) in zip(axes[0], panels):
        for pat, h in g.groupby("pattern", sort=False):
            dense = pat == "dense"
            ax.scatter(
                h[x],
                h["value"],
                s=90 if dense else 22,
                marker="*" if dense else "o",
                color=colours[pat],
                label=pat,
                zorder=3,
            )
        front = g[g["frontier"]].sort_values(x)
        # better-is-up steps: each frontier point holds until the next, larger-cost one
        ax.step(front[x], front["value"], where="post", color="tab:red", lw=1.2, label="Pareto frontier", zorder=2)
        ax.scatter(front[x], front["value"], s=60, facecolors="none", edgecolors="tab:red", zorder=4)
        if x == "size_bytes" and g[x].max() > 10 * g[x].min() > 0:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.set_title(f"{model} / {dataset}: {metric} vs {x}", fontsize=9)
        ax.legend(fontsize=7)
    return save(fig, out_dir, f"frontier_{x}")


def order_map(cells: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per stage pair, a bits × sparsity grid: colour = A (red: f1 first better), text = the winning order's first
    stage, A, and the PIH prediction (✓ where it matches the winner); hatched where A's interval covers zero,
    '?' where there are no samples for an interval."""
    if cells.empty:
        return []
    panels = list(cells.groupby(["model", "dataset", "stages", "group_size", "act_bits"], dropna=False, sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    vmax = float(cells["A"].abs().max()) or 1.0
    for ax, ((model, dataset, pair, _, act), g) in zip(axes[0], panels):
        bits = sorted(g["bits"].unique())
        sparsity = sorted(g["sparsity"].unique())
        grid = np.full((len(bits), len(sparsity)), np.nan)
        for _, c in g.iterrows():
            i, j = bits.index(c["bits"]), sparsity.index(c["sparsity"])
            grid[i, j] = c["A"]
            won = "tie" if c["winner"] == "tie" else f"{c['winner'].split(' > ')[0]} first"
            predicted = c["predicted"].split(" > ")[0] if isinstance(c["predicted"], str) else "–"
            agree, significant = _flag(c["agree"]), _flag(c["significant"])
            mark = {True: " ✓", False: " ✗"}.get(agree, "")
            sig = {True: "", False: " n.s."}.get(significant, " ?")
            ax.text(
                j,
                i,
                f"{won}\nA={c['A']:+.3g}{sig}\nPIH: {predicted}{mark}",
                ha="center",
                va="center",
                fontsize=6.5,
                color="white" if abs(c["A"]) > 0.6 * vmax else "black",
            )
            if significant is False:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", lw=0, edgecolor="grey"))
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower", alpha=0.8)
        ax.set_xticks(range(len(sparsity)), [f"{s:g}" for s in sparsity])
        ax.set_yticks(range(len(bits)), [f"{b:g}" for b in bits])
        ax.set_xlabel("sparsity")
        ax.set_ylabel("bits")
        f1, f2 = pair.split(",")
        acts = "" if pd.isna(act) else f", A{act:g}"
        ax.set_title(
            f"{model} / {dataset}{acts}: which order wins\nA > 0 (red): {f1} first; hatched: CI covers 0", fontsize=8
        )
        fig.colorbar(im, ax=ax, shrink=0.8, label=f"A({f1}→{f2})")
    return save(fig, out_dir, "order_map")


def _flag(v: object) -> bool | None:
    """A verdict column's value as True/False, or None where it is undecided (NaN, None)."""
    return None if v is None or pd.isna(v) else bool(v)
