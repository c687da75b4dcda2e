"""`compress-order table | analyze | collect | frontier | best`: from the tidy rows of runs to tables and figures.

    compress-order collect outputs/multirun/2025-01-01/12-00-00 --out all.parquet
    compress-order table outputs/multirun/... --metric perplexity --where bits=4 --format latex --out t.tex
    compress-order analyze outputs/multirun/... --out-dir report/
    compress-order frontier outputs/multirun/... --x size_bytes --format csv --out report/
    compress-order best outputs/multirun/... --max-size 1.2GB
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from compress_order.analysis import bootstrap, collect, frontier, pih
from compress_order.analysis.tables import (
    SETTING, TABLE_INDEX, apply_where, direction, node_values, order_table, primary_metric, render, seed_dependent,
)
from compress_order.errors import UserError
from compress_order.schema import PREDICTED_CSV, PREDICTED_MD, SIMULATED


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as UserError (one line, exit 2 from the CLI), not its own exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _parser(cmd: str) -> _Parser:
    p = _Parser(prog=f"compress-order {cmd}", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, multirun folders or collected files")
    p.add_argument("--where", action="append", default=[], metavar="COL=VALUE",
                   help="keep rows where COL equals VALUE (or one of VALUE,VALUE); repeatable")  # fmt: skip
    if cmd == "collect":
        p.add_argument("--out", default="collected.parquet", help="output file, .parquet or .csv")
        return p
    p.add_argument("--metric", help="metric to compare (default: perplexity if present, else top1)")
    if cmd in ("frontier", "best"):
        p.add_argument("--backend", default=SIMULATED,
                       help=f"backend whose latency_ms is read (default: {SIMULATED})")  # fmt: skip
        p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    if cmd == "frontier":
        p.add_argument("--x", default="size_bytes", choices=frontier.COSTS, help="the cost axis")
        p.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
        p.add_argument("--out", metavar="DIR", help="where the table and figure go (default: PATH/analysis)")
        p.add_argument("--no-plots", action="store_true")
        return p
    if cmd == "best":
        p.add_argument("--max-size", metavar="SIZE", help="size budget: 500MB, 1.2GB, 800kB, 2GiB or bytes")
        p.add_argument("--max-bits", type=float, metavar="BITS", help="average packed bits per weight")
        p.add_argument("--max-latency-ms", type=float, metavar="MS", help="latency_ms of --backend")
        return p
    if cmd == "table":
        p.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
        p.add_argument("--out", help="write the table to this file instead of printing it")
        p.add_argument("--dense", action="store_true", help="add the dense baseline column")
        p.add_argument("--singles", action="store_true", help="add a column per stage applied alone")
        p.add_argument("--names", default="auto", choices=["auto", "label", "pattern"],
                       help="order columns by label, or by kind/position to compare across stage lists")  # fmt: skip
    else:
        p.add_argument("--out-dir", help="where tables and figures go (default: PATH/analysis)")
        p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
        p.add_argument("--no-plots", action="store_true")
    return p


def main(cmd: str, args: list[str]) -> int:
    try:
        ns = _parser(cmd).parse_args(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    df = apply_where(collect.collect(ns.paths), ns.where)
    if df.empty:
        raise UserError("no rows left after --where " + " ".join(ns.where))
    handlers = {"collect": _collect, "table": _table, "analyze": _analyze, "frontier": _frontier, "best": _best}
    return handlers[cmd](df, ns)


def _collect(df: pd.DataFrame, ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    if out.suffix not in (".parquet", ".csv"):
        raise UserError(f"--out {out}: use a .parquet or .csv file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    else:
        df.to_csv(out, index=False)
    print(f"{collect.describe(df)} → {out}")
    for _, row in df[df["status"] == "failed"].drop_duplicates("path").iterrows():
        print(f"  failed: {row['path']}: {str(row['error']).splitlines()[0] if pd.notna(row['error']) else ''}")
    return 0


def _table(df: pd.DataFrame, ns: argparse.Namespace) -> int:
    metric = ns.metric or primary_metric(df)
    table, caption = order_table(df, metric, dense=ns.dense, singles=ns.singles, names=ns.names)
    text = render(table, ns.format, caption)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(text)
        print(f"{collect.describe(df)}; table → {ns.out}")
    else:
        print(text, end="")
    return 0


def _analyze(df: pd.DataFrame, ns: argparse.Namespace) -> int:
    first = Path(ns.paths[0])
    out_dir = Path(ns.out_dir) if ns.out_dir else (first if first.is_dir() else first.parent) / "analysis"
    text = write_report(df, out_dir, metric=ns.metric, n_boot=ns.n_boot, plots=not ns.no_plots)
    print(f"{collect.describe(df)}\n\n{text}", end="")
    return 0


def _frontier(df: pd.DataFrame, ns: argparse.Namespace) -> int:
    metric = ns.metric or primary_metric(df)
    pts = frontier.frontier(frontier.nodes(df, metric, ns.backend), ns.x)
    table, caption = frontier.frontier_table(pts, ns.x, metric, direction(df, metric) > 0)
    text = render(table, ns.format, caption)
    print(text, end="")
    first = Path(ns.paths[0])
    out_dir = Path(ns.out) if ns.out else (first if first.is_dir() else first.parent) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = {"markdown": "md", "csv": "csv", "latex": "tex"}[ns.format]
    (out_dir / f"frontier.{suffix}").write_text(text)
    frontier.shown(pts).drop(columns=["score", "keys"]).to_csv(out_dir / "frontier_nodes.csv", index=False)
    written = [out_dir / f"frontier.{suffix}", out_dir / "frontier_nodes.csv"]
    if not ns.no_plots:
        from compress_order.analysis import plots as figs

        written += figs.frontier(pts, ns.x, metric, out_dir)
    print(f"\n{collect.describe(df)}; " + ", ".join(p.name for p in written) + f" → {out_dir}/")
    return 0


def _best(df: pd.DataFrame, ns: argparse.Namespace) -> int:
    budgets = {cost: limit for cost, limit in (
        ("size_bytes", None if ns.max_size is None else frontier.parse_size(ns.max_size)),
        ("avg_bits", ns.max_bits), ("latency_ms", ns.max_latency_ms)) if limit is not None}  # fmt: skip
    if not budgets:
        raise UserError("give a budget: --max-size SIZE, --max-bits BITS or --max-latency-ms MS")
    metric = ns.metric or primary_metric(df)
    for cost in budgets:
        if cost not in set(df.loc[df["status"] == "ok", "metric"]):
            raise UserError(f"no successful '{cost}' rows in these results to hold to a budget")
    pts = frontier.nodes(df, metric, ns.backend)
    answers = []
    for panel, g in pts.groupby(frontier.PANEL, dropna=False, sort=False):
        fit = frontier.within(g, budgets)
        answers.append((panel, g, fit))
    if all(fit.empty for *_, fit in answers):
        small = frontier.smallest(pts)
        raise UserError(f"no node meets {frontier.budget_text(budgets)}; the smallest is '{small['order']}' "
                        f"({small['stages']}) at {frontier.format_size(small['size_bytes'])}, "
                        f"{small['avg_bits']:.3g} bits/weight")  # fmt: skip
    arrow = "higher" if direction(df, metric) > 0 else "lower"
    lines = [f"budget: {frontier.budget_text(budgets)}; {metric} ({arrow} is better)"
             + (", 95% intervals over evaluation windows (and seeds where several)" if ns.n_boot > 0 else "")]
    latency = "latency_ms" in budgets
    for (model, dataset), g, fit in answers:
        lines += ["", f"{model} on {dataset}: {len(fit)} of {len(g)} distinct nodes fit"]
        if fit.empty:
            small = frontier.smallest(g)
            small = small.assign(low=None, high=None)
            lines.append(f"  none; the smallest is {frontier.describe_node(small, metric, latency)}")
            continue
        top = _with_intervals(df, fit.head(2), metric, ns.n_boot)
        best = top.iloc[0]
        lines.append(f"  best:      {frontier.describe_node(best, metric, latency)}")
        if len(top) < 2:
            lines.append("  no runner-up within the budget")
            continue
        runner = top.iloc[1]
        lines.append(f"  runner-up: {frontier.describe_node(runner, metric, latency)}")
        lines.append(f"             {_distinguish(df, best, runner, metric, ns.n_boot)}")
    print("\n".join(lines))
    return 0


def _distinguish(df: pd.DataFrame, best: pd.Series, runner: pd.Series, metric: str, n_boot: int) -> str:
    """Whether the runner-up is distinguishable from the best: by their paired difference where they were
    evaluated on the same units, else by whether their own intervals overlap."""
    paired = frontier.paired_difference(df, best, runner, metric, n_boot)
    if paired is not None:
        diff, lo, hi = paired
        ci = f"the best's advantage {diff:.4g} [{lo:.4g}, {hi:.4g}] in {metric}, paired over the same units"
        return (f"not distinguishable from the best ({ci}: the interval covers 0)" if lo <= 0 <= hi
                else f"distinguishable: worse than the best ({ci})")  # fmt: skip
    return {None: "no intervals (no per-unit samples) to tell them apart",
            True: "not distinguishable from the best (their intervals overlap; unpaired: no shared evaluation units)",
            False: "worse than the best (their intervals do not overlap)"}[frontier.overlap(best, runner)]


def _with_intervals(df: pd.DataFrame, pts: pd.DataFrame, metric: str, n_boot: int) -> pd.DataFrame:
    """`pts` with each node's interval over windows and seeds (`low`, `high`; NaN without samples)."""
    keys = pts[frontier.NODE]
    rows = df.merge(keys, on=frontier.NODE, how="inner")
    ci = bootstrap.node_intervals(rows, metric, n_boot, roles=("dense", "single", "partial", "full"))
    return pts.merge(ci[[*frontier.NODE, "low", "high"]], on=frontier.NODE, how="left")


# --- the analysis report ------------------------------------------------------------------------------------------


def write_report(df: pd.DataFrame, out_dir: Path, metric: str | None = None, n_boot: int = 1000,
                 plots: bool = True) -> str:  # fmt: skip
    """Tables (md/csv/tex), per-setting PIH quantities pooled over calibration seeds with their intervals, seed
    summaries and figures into `out_dir`; returns the markdown report (also written as analysis.md)."""
    metric = metric or primary_metric(df)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, caption = order_table(df, metric, dense=True, singles=True)
    for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
        (out_dir / f"table.{suffix}").write_text(render(table, fmt, caption))

    stages, settings = pih.analyze(df, metric)
    diffs = bootstrap.order_differences(df, metric, n_boot)
    settings = bootstrap.attach_a_interval(settings, diffs)
    stages.to_csv(out_dir / "stages.csv", index=False)
    settings.to_csv(out_dir / "settings.csv", index=False)
    agree = pih.agreement_by_pair(settings)
    if not agree.empty:
        for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
            (out_dir / f"agreement.{suffix}").write_text(render(agree, fmt, AGREEMENT_CAPTION, floatfmt=".3g"))
    if not diffs.empty:
        diffs.to_csv(out_dir / "differences.csv", index=False)

    arrow = "higher" if direction(df, metric) > 0 else "lower"
    lines = [f"# Order analysis: {metric} ({arrow} is better)", "", f"## Orders\n\n{caption}", "",
             table.to_markdown(index=False, floatfmt=".4g"), ""]  # fmt: skip
    lines += _pih_section(stages, settings)
    lines += _agreement_section(agree)
    lines += _significance_section(diffs, df)
    lines += _seed_section(df, metric, n_boot)
    cells = frontier.order_map_cells(settings)
    if not cells.empty:
        cells.to_csv(out_dir / "order_map.csv", index=False)
    if plots:
        from compress_order.analysis import plots as figs

        intervals = bootstrap.node_intervals(df, metric, n_boot)
        written = figs.a_vs_g(settings, out_dir, metric) + figs.order_bars(intervals, out_dir, metric)
        written += figs.a_heatmap(settings, out_dir) + figs.order_map(cells, out_dir)
        lines += ["## Figures", "", *[f"- {p.name}" for p in written if p.suffix == ".png"], ""]
    lines += _unreadable_section()
    text = "\n".join(lines)
    (out_dir / "analysis.md").write_text(text)
    return text + f"\nwritten to {out_dir}/\n"


AGREEMENT_CAPTION = (
    "How often the order predicted from the stages alone (PIH: weaker first; what `predict_only=true` reports) "
    "was the measured winner: settings, decided (a prediction and a unique winner), agree, rate; significant: "
    "settings whose A interval excludes 0, agree_significant of those."
)


def _agreement_section(agree: pd.DataFrame) -> list[str]:
    if agree.empty:
        return []
    return ["## Can the prediction from singles be trusted?", "", render(agree, "markdown", AGREEMENT_CAPTION, ".3g")]


def write_predictions(df: pd.DataFrame, out_dir: Path, metric: str, done: str) -> str:
    """predicted.md / predicted.csv of a `predict_only` run: per setting, the stages by intensity alone and the
    order the PIH predicts; `done` says what the run cost against the full trie. Returns the markdown."""
    pred = pih.predictions(df, metric)
    pred.to_csv(out_dir / PREDICTED_CSV, index=False)
    arrow = "higher" if direction(df, metric) > 0 else "lower"
    if pred.empty:
        body = "a single stage: there is no order to predict"
    else:
        key, fixed = _varying(pred, [*TABLE_INDEX, "n_seeds"])
        cols = key + ["dense", "intensity", "predicted"] + (["why"] if pred["why"].ne("").any() else [])
        body = (f"Fixed: {fixed}\n\n" if fixed else "") + pred[cols].to_markdown(index=False, floatfmt=".4g")
    text = "\n".join([
        f"## Predicted order ({metric}, {arrow} is better)", "",
        "Progressive Intensity Hypothesis: apply the weaker stage first, intensity I(f) = how much f alone degrades "
        "the dense model; no full order was run (`predict_only=true`).", "", body, "", f"- {done}", "",
    ])  # fmt: skip
    (out_dir / PREDICTED_MD).write_text(text)
    return text


def verdict(significant: object, noise: object) -> str:
    """A significance verdict that says what noise it accounts for (never a bare 'significant' when calibration
    noise was not sampled)."""
    if pd.isna(significant) or significant is None:
        return ""
    if not significant:
        return "no (CI covers 0)"
    if noise == bootstrap.WINDOWS_ONLY:
        return "windows only: CI excludes 0, calibration noise not covered (1 seed)"
    return "yes"


def _unreadable_section() -> list[str]:
    if not collect.UNREADABLE:
        return []
    return ["## Unreadable files (skipped)", "", *[f"- {p}: {why}" for p, why in collect.UNREADABLE.items()], ""]


def _varying(frame: pd.DataFrame, cols: list[str]) -> tuple[list[str], str]:
    """Columns that change across rows, and 'col=value' for those that do not (said once above a table)."""
    varying = [c for c in cols if frame[c].nunique(dropna=False) > 1]
    fixed = ", ".join(f"{c}={frame[c].iloc[0]}" for c in cols if c not in varying and pd.notna(frame[c].iloc[0]))
    return varying, fixed


def _pih_section(stages: pd.DataFrame, settings: pd.DataFrame) -> list[str]:
    if settings.empty:
        return ["## Progressive Intensity Hypothesis", "", "no setting has two or more stages", ""]
    key, fixed = _varying(settings, [*TABLE_INDEX, "n_seeds"])
    shown = settings.assign(
        A_ci=[f"[{lo:.3g}, {hi:.3g}]" if pd.notna(lo) else "" for lo, hi in zip(settings["A_low"], settings["A_high"])],
        A_verdict=[verdict(s, n) for s, n in zip(settings["A_significant"], settings["A_noise"])],
    )  # fmt: skip
    cols = key + ["f1", "f2", "I_f1", "I_f2", "G", "A", "A_ci", "A_noise", "A_verdict", "cer_f1", "cer_f2",
                  "predicted", "observed", "agree"]  # fmt: skip
    cols = [c for c in cols if shown[c].notna().any() and (shown[c] != "").any()]
    rate, k, n = pih.agreement(settings)
    rate_s, k_s, n_s = pih.agreement(settings, significant_only=True)
    rho, p, m = pih.rank_correlation(settings, "G", "A")
    rho_c, p_c, m_c = pih.rank_correlation(settings, "dCER", "A")
    intensity_key, _ = _varying(stages, TABLE_INDEX)
    pooled = "; values are means over calibration seeds" if settings["n_seeds"].max() > 1 else ""
    return [
        "## Progressive Intensity Hypothesis",
        "",
        "I(f) = gap of f alone to dense (positive = degrades); G = I(f2) − I(f1); "
        f"A = advantage of f1→f2 over f2→f1 (positive = f1 first is better); CER in equivalent bits{pooled}.",
        f"Fixed: {fixed}" if fixed else "",
        "",
        shown[cols].to_markdown(index=False, floatfmt=".4g"),
        "",
        f"- PIH agreement (predicted weaker-first order is the observed best): {k}/{n} = {rate:.0%}"
        if n else "- PIH agreement: no setting with a decided prediction and observation",
        f"- among settings whose A interval excludes 0: {k_s}/{n_s}" + (f" = {rate_s:.0%}" if n_s else ""),
        f"- Spearman(A, G): rho = {rho:.3f} (p = {p:.3g}, n = {m})",
        f"- Spearman(A, ΔCER): rho = {rho_c:.3f} (p = {p_c:.3g}, n = {m_c})",
        "",
        "### Stages alone",
        "",
        stages[intensity_key + ["stage", "kind", "alone", "intensity", "cer_bits"]].to_markdown(index=False,
                                                                                              floatfmt=".4g"),
        "",
    ]  # fmt: skip


def _noise_note(diffs: pd.DataFrame, df: pd.DataFrame) -> list[str]:
    """What the intervals cover, in words, for the kinds of `noise` present."""
    notes = []
    if (diffs["noise"] == bootstrap.SEEDS_AND_WINDOWS).any():
        few = int(diffs.loc[diffs["noise"] == bootstrap.SEEDS_AND_WINDOWS, "n_seeds"].min())
        notes.append(
            "- seeds+windows: the union of a two-level bootstrap (calibration seeds with replacement, then evaluation "
            "windows paired within each seed) and a t-interval over the per-seed differences"
            + (f"; with as few as {few} seeds the interval is wide and itself uncertain" if few < 5 else "")
        )
    if (diffs["noise"] == bootstrap.WINDOWS_ONLY).any():
        calibrated = sorted({lab for s in df["stages"].dropna().unique() for lab in s.split(",")
                             if seed_dependent(lab)})  # fmt: skip
        notes.append(
            f"- windows only: one calibration seed of seed-dependent stages ({', '.join(calibrated)}); the interval "
            "covers evaluation-window noise, not calibration noise, which can be larger — rerun with "
            "`-m seed=0,1,2` for a verdict across seeds"
        )
    if (diffs["noise"] == bootstrap.SEED_FREE).any():
        notes.append("- windows (seed-free): data-free stages, whose result does not depend on the seed")
    return notes


def _significance_section(diffs: pd.DataFrame, df: pd.DataFrame) -> list[str]:
    if diffs.empty:
        return ["## Significance", "", "no per-unit samples (samples.parquet) for this metric: no intervals", ""]
    key, _ = _varying(diffs, TABLE_INDEX)
    shown = diffs.assign(verdict=[verdict(s, n) for s, n in zip(diffs["significant"], diffs["noise"])])
    cols = [*key, "order_a", "order_b", "diff", "seed_sd", "low", "high", "noise", "n_seeds", "verdict"]
    cols = [c for c in cols if c != "seed_sd" or shown[c].notna().any()]
    return [
        "## Significance (95% intervals)",
        "",
        "diff > 0: order_a is better than order_b (mean over seeds; seed_sd: its spread across seeds).",
        *_noise_note(diffs, df),
        "",
        shown[cols].to_markdown(index=False, floatfmt=".4g"),
        "",
    ]


def _seed_section(df: pd.DataFrame, metric: str, n_boot: int) -> list[str]:
    if df["seed"].nunique() < 2:
        return []
    nodes = node_values(df, metric)
    nodes = nodes[nodes["role"] != "partial"].drop_duplicates([*SETTING, "order"])
    per_node = bootstrap.seed_summary(nodes, ["value"], by=[*TABLE_INDEX, "order"])
    per_node["value"] = [bootstrap.mean_sd(m, s) for m, s in zip(per_node["value_mean"], per_node["value_std"])]
    key, _ = _varying(per_node, TABLE_INDEX)
    lines = ["## Seeds", "", "Every node: mean ± sd over calibration seeds.", "",
             per_node[key + ["order", "value", "n_seeds"]].to_markdown(index=False), ""]  # fmt: skip
    per_seed = pih.analyze(df, metric, by_seed=True)[1]
    if per_seed["A"].notna().any():
        a = bootstrap.seed_summary(per_seed.dropna(subset=["A"]), ["A", "G"])
        a["A"] = [bootstrap.mean_sd(m, s) for m, s in zip(a["A_mean"], a["A_std"])]
        a["G"] = [bootstrap.mean_sd(m, s) for m, s in zip(a["G_mean"], a["G_std"])]
        lines += ["A and G: mean ± sd over seeds.", "", a[key + ["A", "G", "n_seeds"]].to_markdown(index=False), ""]
    if n_boot > 0:
        each = pd.concat([bootstrap.order_differences(g, metric, n_boot).assign(seed=s)
                          for s, g in df.groupby("seed", sort=True)], ignore_index=True)  # fmt: skip
        if not each.empty:
            each["verdict"] = [verdict(s, n) for s, n in zip(each["significant"], each["noise"])]
            lines += ["Each seed alone (its interval covers that seed's evaluation windows only):", "",
                      each[key + ["seed", "order_a", "order_b", "diff", "low", "high", "verdict"]].to_markdown(
                          index=False, floatfmt=".4g"), ""]  # fmt: skip
    return lines
