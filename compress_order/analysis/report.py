"""The analysis report (`compress-order analyze`) and a predict_only run's predictions: markdown sections, tables
and figures from the tidy rows of runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from compress_order.analysis import bootstrap, collect, frontier, pih
from compress_order.analysis.tables import (
    SETTING,
    TABLE_INDEX,
    direction,
    node_values,
    order_table,
    primary_metric,
    render,
    seed_dependent,
)
from compress_order.core.schema import PREDICTED_CSV, PREDICTED_MD


def write_report(
    df: pd.DataFrame, out_dir: Path, metric: str | None = None, n_boot: int = 1000, plots: bool = True
) -> str:
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
    lines = [
        f"# Order analysis: {metric} ({arrow} is better)",
        "",
        f"## Orders\n\n{caption}",
        "",
        table.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
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
    text = "\n".join(
        [
            f"## Predicted order ({metric}, {arrow} is better)",
            "",
            "Progressive Intensity Hypothesis: apply the weaker stage first, intensity I(f) = how much f alone degrades "
            "the dense model; no full order was run (`predict_only=true`).",
            "",
            body,
            "",
            f"- {done}",
            "",
        ]
    )
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
    )
    cols = key + [
        "f1",
        "f2",
        "I_f1",
        "I_f2",
        "G",
        "A",
        "A_ci",
        "A_noise",
        "A_verdict",
        "cer_f1",
        "cer_f2",
        "predicted",
        "observed",
        "agree",
    ]
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
        if n
        else "- PIH agreement: no setting with a decided prediction and observation",
        f"- among settings whose A interval excludes 0: {k_s}/{n_s}" + (f" = {rate_s:.0%}" if n_s else ""),
        f"- Spearman(A, G): rho = {rho:.3f} (p = {p:.3g}, n = {m})",
        f"- Spearman(A, ΔCER): rho = {rho_c:.3f} (p = {p_c:.3g}, n = {m_c})",
        "",
        "### Stages alone",
        "",
        stages[intensity_key + ["stage", "kind", "alone", "intensity", "cer_bits"]].to_markdown(
            index=False, floatfmt=".4g"
        ),
        "",
    ]


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
        calibrated = sorted(
            {lab for s in df["stages"].dropna().unique() for lab in s.split(",") if seed_dependent(lab)}
        )
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
    lines = [
        "## Seeds",
        "",
        "Every node: mean ± sd over calibration seeds.",
        "",
        per_node[key + ["order", "value", "n_seeds"]].to_markdown(index=False),
        "",
    ]
    per_seed = pih.analyze(df, metric, by_seed=True)[1]
    if per_seed["A"].notna().any():
        a = bootstrap.seed_summary(per_seed.dropna(subset=["A"]), ["A", "G"])
        a["A"] = [bootstrap.mean_sd(m, s) for m, s in zip(a["A_mean"], a["A_std"])]
        a["G"] = [bootstrap.mean_sd(m, s) for m, s in zip(a["G_mean"], a["G_std"])]
        lines += ["A and G: mean ± sd over seeds.", "", a[key + ["A", "G", "n_seeds"]].to_markdown(index=False), ""]
    if n_boot > 0:
        each = pd.concat(
            [bootstrap.order_differences(g, metric, n_boot).assign(seed=s) for s, g in df.groupby("seed", sort=True)],
            ignore_index=True,
        )
        if not each.empty:
            each["verdict"] = [verdict(s, n) for s, n in zip(each["significant"], each["noise"])]
            lines += [
                "Each seed alone (its interval covers that seed's evaluation windows only):",
                "",
                each[key + ["seed", "order_a", "order_b", "diff", "low", "high", "verdict"]].to_markdown(
                    index=False, floatfmt=".4g"
                ),
                "",
            ]
    return lines
