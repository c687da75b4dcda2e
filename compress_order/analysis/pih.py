"""The paper's quantities: stage intensity, performance gap G, order advantage A, the Compression Equivalent
Ratio, and the Progressive Intensity Hypothesis (PIH: apply the weaker stage first).

Sign conventions. Let d = +1 for a higher-is-better metric (top1) and d = -1 for a lower-is-better one
(perplexity, nll), so d·M is a score where larger is always better. Then, for a setting with stage list [f1, f2]:

* intensity I(f) = d·(M(dense) − M(f alone)): how much f alone degrades the model (≥ 0 for a sane stage);
* G = I(f2) − I(f1): positive when f2 is the stronger stage;
* A(f1→f2) = d·(M(f1 then f2) − M(f2 then f1)), i.e. M(f2∘f1) − M(f1∘f2) for top1 and the reverse for
  perplexity: positive always means applying f1 first is better.

PIH predicts the order that sorts stages by increasing intensity, hence sign(A) = sign(G) and a positive rank
correlation between A and G across settings.

CER: a stage alone reaches some metric value; its Compression Equivalent Ratio is the bit width at which the
setting's quantization stage alone reaches the same value, read off the quantization-only curve (runs at several
`bits`) by linear interpolation. It is expressed in bits (dense_bits / CER is the equivalent compression ratio);
a smaller CER is a stronger stage, so ΔCER = CER(f1) − CER(f2) has the orientation of G.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from compress_order.analysis.tables import (
    SETTING,
    TABLE_INDEX,
    direction,
    is_sequential,
    keyed_like,
    node_values,
    stage_kind,
)

CURVE_KEY = ["model", "dataset", "group_size", "act_bits"]  # the quantization curve of one setting


def equivalent_bits(bits: Sequence[float], values: Sequence[float], target: float) -> float:
    """Bit width whose metric on the curve (bits → values) equals `target`, by linear interpolation.

    Segments are searched from the widest bit width down, so a non-monotone curve gives the highest matching
    width; a target outside the measured range is NaN (no extrapolation).
    """
    pts = sorted(zip(bits, values), reverse=True)
    for (b_hi, v_hi), (b_lo, v_lo) in zip(pts, pts[1:]):
        if min(v_hi, v_lo) <= target <= max(v_hi, v_lo):
            if v_hi == v_lo:
                return float(b_hi)
            return float(b_lo + (b_hi - b_lo) * (target - v_lo) / (v_hi - v_lo))
    return math.nan


def quant_curves(nodes: pd.DataFrame) -> pd.Series:
    """Metric of each quantization stage alone by (model, dataset, group_size, stage, bits), over all runs."""
    single = nodes[(nodes["role"] == "single") & (nodes["order"].map(stage_kind) == "quantize")]
    single = single.assign(**{k: single[k].map(_present) for k in CURVE_KEY})
    return single.groupby([*CURVE_KEY, "order", "bits"], dropna=False)["value"].mean()


def _present(v: object) -> object:
    """A missing setting (no activation quantization) as a value index lookups can match (NaN never equals)."""
    return "none" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _cer(curves: pd.Series, setting: dict, labels: list[str], alone: float) -> float:
    quant = next((lab for lab in labels if stage_kind(lab) == "quantize"), None)
    key = (*(_present(setting[k]) for k in CURVE_KEY), quant)
    if quant is None or math.isnan(alone) or key not in curves.index.droplevel("bits"):
        return math.nan
    curve = curves.loc[key]
    if len(curve) < 2:
        return math.nan
    return equivalent_bits(curve.index.tolist(), curve.tolist(), alone)


def predicted_order(labels: list[str], intensity: dict[str, float]) -> str | None:
    """PIH: weaker (less intense) stage first. None when an intensity is missing or two are tied."""
    values = [intensity[lab] for lab in dict.fromkeys(labels)]
    if any(math.isnan(v) for v in values) or len(set(values)) < len(values):
        return None
    return " > ".join(sorted(labels, key=intensity.get))


def analyze(df: pd.DataFrame, metric: str, by_seed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-stage rows (alone, intensity, cer_bits) and per-setting rows (G, A, CERs, predicted/observed order).

    A setting pools its calibration seeds (`n_seeds`): every node's value is its mean over seeds, so A and G are
    the means of the per-seed A and G, and the predicted and observed orders are those of the means.
    `by_seed=True` gives one row per seed instead.
    """
    nodes = node_values(df, metric)
    d = direction(df, metric)
    curves = quant_curves(nodes)
    key_cols = SETTING if by_seed else TABLE_INDEX
    stage_rows, setting_rows = [], []
    for key, g in nodes.groupby(key_cols, dropna=False, sort=False):
        setting = {**dict(zip(key_cols, key)), "n_seeds": g["seed"].nunique()}
        labels = setting["stages"].split(",")
        value = g.groupby("order", sort=False)["value"].mean()
        dense = value.get("dense", math.nan)
        intensity, cer = {}, {}
        for lab in dict.fromkeys(labels):
            alone = value.get(lab, math.nan)
            intensity[lab] = d * (dense - alone)
            cer[lab] = _cer(curves, setting, labels, alone)
            stage_rows.append(
                {
                    **setting,
                    "stage": lab,
                    "kind": stage_kind(lab),
                    "alone": alone,
                    "intensity": intensity[lab],
                    "cer_bits": cer[lab],
                }
            )
        if len(labels) < 2:
            continue
        score = d * value[[o for o in value.index if " > " in o and is_sequential(o, setting["stages"])]]
        # a tie between the best orders observes no winner (it cannot confirm or refute the prediction)
        observed = str(score.idxmax()) if (score == score.max()).sum() == 1 else None
        predicted = predicted_order(labels, intensity)
        row = {
            **setting,
            "n_stages": len(labels),
            "dense": dense,
            "predicted": predicted,
            "observed": observed,
            "agree": None if predicted is None or observed is None else bool(predicted == observed),
        }
        if len(labels) == 2 and labels[0] != labels[1]:
            f1, f2 = labels
            row.update(
                f1=f1,
                f2=f2,
                I_f1=intensity[f1],
                I_f2=intensity[f2],
                G=intensity[f2] - intensity[f1],
                A=score.get(f"{f1} > {f2}", math.nan) - score.get(f"{f2} > {f1}", math.nan),
                cer_f1=cer[f1],
                cer_f2=cer[f2],
                dCER=cer[f1] - cer[f2],
            )
        setting_rows.append(row)
    columns = [
        *key_cols,
        "n_seeds",
        "n_stages",
        "f1",
        "f2",
        "dense",
        "I_f1",
        "I_f2",
        "G",
        "A",
        "cer_f1",
        "cer_f2",
        "dCER",
        "predicted",
        "observed",
        "agree",
    ]
    return keyed_like(pd.DataFrame(stage_rows), df), keyed_like(pd.DataFrame(setting_rows).reindex(columns=columns), df)


PREDICTION_COLUMNS = [*TABLE_INDEX, "n_seeds", "dense", "intensity", "predicted", "why"]


def predictions(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The order the PIH predicts for each setting of two or more stages, read from the dense and single-stage
    nodes only (so a `predict_only` run, which has no full order, is enough): stages sorted by intensity, weaker
    first, with `intensity` in words ("rtn 0.1 < magnitude 1.8") and `why` when nothing is predicted."""
    stages, settings = analyze(df, metric)
    if settings.empty:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    ranked = []
    for key, g in stages.groupby(TABLE_INDEX, dropna=False, sort=False):
        pairs = sorted(zip(g["stage"], g["intensity"]), key=lambda p: (math.isnan(p[1]), p[1]))
        ranked.append(
            {
                **dict(zip(TABLE_INDEX, key)),
                "intensity": " < ".join(f"{s} {i:.4g}" for s, i in pairs),
                "missing": any(math.isnan(i) for _, i in pairs),
            }
        )
    out = settings.merge(keyed_like(pd.DataFrame(ranked), stages), on=TABLE_INDEX, how="left")
    out["why"] = np.where(
        out["predicted"].notna(),
        "",
        np.where(out["missing"].eq(False), "tied intensities", "a stage alone was not evaluated"),
    )
    return out.reindex(columns=PREDICTION_COLUMNS)


def agreement_by_pair(settings: pd.DataFrame) -> pd.DataFrame:
    """How often the prediction from singles named the measured winner, per model, dataset and stage list:
    `settings` (with A's interval), `decided` (both a prediction and a unique winner), `agree`, `rate`,
    `significant` (A's interval excludes 0), and among those with a prediction `agree_significant`, its rate."""
    cols = [
        "model",
        "dataset",
        "stages",
        "settings",
        "decided",
        "agree",
        "rate",
        "significant",
        "agree_significant",
        "rate_significant",
    ]
    rows = []
    for (model, dataset, stages), g in settings.groupby(["model", "dataset", "stages"], dropna=False, sort=False):
        rate, k, n = agreement(g)
        rate_s, k_s, n_s = agreement(g, significant_only=True)
        significant = int(g.get("A_significant", pd.Series(dtype=object)).eq(True).sum())
        rows.append(
            dict(
                model=model,
                dataset=dataset,
                stages=stages,
                settings=len(g),
                decided=n,
                agree=k,
                rate=rate,
                significant=significant,
                agree_significant=k_s,
                rate_significant=rate_s,
            )
        )
    return pd.DataFrame(rows, columns=cols)


def agreement(settings: pd.DataFrame, significant_only: bool = False) -> tuple[float, int, int]:
    """Share of settings whose observed best order is the PIH prediction: (rate, agreeing, decided settings).

    `significant_only`: count only settings whose A interval (`A_significant`) excludes zero, i.e. whose observed
    winner is not within the noise the interval covers.
    """
    decided = settings
    if significant_only:
        decided = settings[settings.get("A_significant", pd.Series(False, index=settings.index)).eq(True)]
    decided = decided["agree"].dropna().astype(bool)
    if decided.empty:
        return math.nan, 0, 0
    return float(decided.mean()), int(decided.sum()), len(decided)


def rank_correlation(settings: pd.DataFrame, x: str = "G", y: str = "A") -> tuple[float, float, int]:
    """Spearman's rho (and p-value) between two columns over the settings that have both: (rho, p, n)."""
    pts = settings[[x, y]].astype(float).dropna()
    if len(pts) < 3 or pts[x].nunique() < 2 or pts[y].nunique() < 2:
        return math.nan, math.nan, len(pts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = spearmanr(pts[x], pts[y])
    return float(res.statistic), float(res.pvalue), len(pts)


def trend(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares line y = slope·x + intercept (for the A-vs-G figure)."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)
