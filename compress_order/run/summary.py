"""A run's summary.md: the node table a person reads first (the primary metric, compression, latency, each
backend's figures), rendered from the run's tidy rows."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd

from compress_order.core.schema import DENSE_REFERENCE, SIMULATED
from compress_order.evaluation.metrics import METRICS, summary_metrics

SUMMARY_METRICS = summary_metrics()


def summary_markdown(df: pd.DataFrame, primary: str, protocol: str) -> str:
    """Orders as rows, metrics as columns; the best full order is marked."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return "no results\n"
    sim = ok[ok["backend"] == SIMULATED]
    n_seeds = ok["seed"].nunique()
    # With several calibration seeds a node's value is its mean over seeds, beside its sd for the primary metric.
    wide = sim.pivot_table(index=["depth", "order"], columns="metric", values="value", aggfunc="mean", sort=False)
    # The usual metrics first, then any task-specific ones (word perplexity, lm-eval tasks, ...)
    extra = [m for m in wide.columns if m not in SUMMARY_METRICS and m not in ("latency_ms_iqr", "decode_ms_per_token")]
    wide = wide[
        [m for m in SUMMARY_METRICS if m in wide.columns and m != "latency_ms"]
        + extra
        + (["latency_ms"] if "latency_ms" in wide.columns else [])
    ]
    if n_seeds > 1 and primary in wide.columns:
        sd = sim[sim["metric"] == primary].groupby(["depth", "order"], sort=False)["value"].std(ddof=1)
        wide.insert(wide.columns.get_loc(primary) + 1, f"{primary} sd", sd.reindex(wide.index))
    real = df[(df["backend"] != SIMULATED) & (df["metric"] == "latency_ms")]
    refs = {
        b: rows.groupby(["depth", "order"], sort=False)["value"].mean().reindex(wide.index)
        for b, rows in real[real["backend"].str.startswith(DENSE_REFERENCE)].groupby("backend")
    }
    for backend, rows in real.groupby("backend", sort=True):
        ms = rows.groupby(["depth", "order"], sort=False)["value"].mean().reindex(wide.index)
        missing = "" if backend.startswith(DENSE_REFERENCE) else "n/a"  # a reference is timed only beside a packed copy
        wide[f"{backend} ms"] = ms.map(lambda v: missing if pd.isna(v) else f"{v:.4g}")
        # vs the dense node in the backend's activation dtype, `name(dtype)`: the dense copy cast to it where one
        # was timed (`dense(dtype)`), else the evaluated model itself (the kernel computes in the model's dtype)
        dtype = backend[backend.rfind("(") :] if backend.endswith(")") else ""
        ref = refs.get(f"dense{dtype}", wide["latency_ms"] if "latency_ms" in wide.columns else None)
        if ref is not None and not backend.startswith(DENSE_REFERENCE):
            speed = ref / ms
            wide[f"{backend} speed-up"] = speed.map(lambda v: "" if pd.isna(v) else f"{v:.2f}×")
    wide = wide.reset_index()
    full = wide[wide["depth"] == wide["depth"].max()]
    best_order = None
    n_stages = len(str(ok["stages"].iloc[0]).split(","))  # a predict_only run stops at depth 1: no full order
    if primary in wide.columns and wide["depth"].max() == n_stages and full[primary].notna().any():
        pick = full[primary].idxmax() if METRICS[primary].higher_is_better else full[primary].idxmin()
        best_order = wide.loc[pick, "order"]
    wide.insert(2, "best", ["◀ best" if o == best_order else "" for o in wide["order"]])
    if "size_bytes" in wide.columns:
        wide["size_bytes"] = wide["size_bytes"].map(lambda b: f"{b / 1e6:.3f} MB")
    arrow = "↑" if METRICS[primary].higher_is_better else "↓"
    lines = [
        f"# {ok['model'].iloc[0]} on {ok['dataset'].iloc[0]}: stages {ok['stages'].iloc[0]}",
        "",
        f"- {protocol}",
        f"- primary metric: {primary} ({arrow} better); `latency_ms` is the dense-simulated forward in the model's "
        f"dtype; a backend `name(dtype)` times a packed copy of the node's own codes with a real kernel whose "
        f"activations are in that dtype (speed-up: the dense node in the same dtype — the evaluated model, or a copy "
        f"cast to it, `dense(dtype)` — ÷ packed forward, same shapes, timed back to back; n/a: no kernel for that "
        f"format, reasons in results)",
    ]
    labels = str(ok["stages"].iloc[0]).split(",")
    n_orders = math.factorial(len(labels)) // math.prod(math.factorial(k) for k in Counter(labels).values())
    n_full = int((full["depth"] == n_stages).sum()) if best_order is not None else 0
    if 0 < n_full < n_orders:  # orders= listed some (or a run stopped early): "best" is not over every order
        lines.append(
            f"- {n_full} of the {n_orders} orders ran (`orders=`): `best` is the best of those, not of every order"
        )
    if n_seeds > 1:
        lines.append(
            f"- values are means over {n_seeds} calibration seeds ({', '.join(map(str, sorted(ok['seed'].unique())))}), "
            f"`{primary} sd` their spread (0 for nodes without a calibrated stage); `compress-order analyze` "
            f"tests order effects against both seed and window noise"
        )
    if best_order is not None and len(full) > 1:
        vals = full[primary]
        lines.append(f"- order effect on {primary}: best − worst full order = {vals.max() - vals.min():.4g}")
    act = ok["act_bits"].dropna().unique() if "act_bits" in ok.columns else []
    if len(act):
        fmts = ok["act_format"].dropna().unique() if "act_format" in ok.columns else []
        fmt = fmts[0] if len(fmts) and fmts[0] != "int" else None  # a float codebook (act_format)
        what = f"{fmt} ({int(act[0])}-bit, act_format)" if fmt else f"{int(act[0])} bits (act_bits)"
        lines.append(
            f"- activations: every compressed layer's inputs fake-quantized to {what} in "
            f"every evaluation and later calibration, the dense row included; latency is timed without it"
        )
    lines += ["", wide.to_markdown(index=False, floatfmt=".4g"), ""]
    bad = df[df["status"] == "infeasible"].drop_duplicates("order")
    if not bad.empty:
        lines += ["Infeasible orders (reported, not run):", ""]
        lines += [f"- `{r.order}`: {r.error}" for r in bad.itertuples()] + [""]
    return "\n".join(lines)
