"""Order-vs-order tables: one row per setting, one column per full order, plus the winner and the gap.

A *setting* is everything but the order that fixes a result (model, data, stage list, targets, seed); the
helpers here turn collected rows into per-node values of one metric, which the analysis modules share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from compress_order.core.errors import UserError
from compress_order.core.registry import stage_files
from compress_order.evaluation.metrics import METRICS, primary_metrics

SETTING = [
    "model",
    "dataset",
    "stages",
    "format",
    "bits",
    "sparsity",
    "expert_sparsity",
    "group_size",
    "act_bits",
    "act_format",
    "seed",
]
TABLE_INDEX = [c for c in SETTING if c != "seed"]  # tables and verdicts pool the calibration seeds of a setting
# Setting columns a table leaves out when every row has this value (the default, which needs no column).
IMPLIED = {"format": "int", "act_format": "int"}  # (empty values aside: act_format is empty where act_bits is)
FORMATS = ("markdown", "csv", "latex")
LATEX_SYMBOLS = {" > ": r" $\rightarrow$ ", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "−": "--", "≤": r"$\leq$"}
LATEX_SPECIALS = {"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#"}  # the caption is not escaped by pandas


def keyed_like(out: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """`out`, grouped from `source` with dropna=False, with text keys that are text again (nulls as None): pandas
    turns the null key of a text column (act_format without activation quantization) into float NaN, which will
    not merge with the column it came from."""
    out = out.copy()
    for c in out.columns.intersection(source.columns):
        if source[c].dtype == object:
            col = out[c].astype(object)
            out[c] = col.where(col.notna(), None)
    return out


# --- selecting rows -------------------------------------------------------------------------------------------


def primary_metric(df: pd.DataFrame) -> str:
    present = set(df.loc[df["status"] == "ok", "metric"].dropna())
    if not present:
        raise UserError("no successful result rows to tabulate")
    return next((m for m in primary_metrics() if m in present), sorted(present)[0])


def higher_is_better(df: pd.DataFrame, metric: str) -> bool:
    if metric in METRICS:
        return METRICS[metric].higher_is_better
    return bool(df.loc[df["metric"] == metric, "higher_is_better"].iloc[0])


def direction(df: pd.DataFrame, metric: str) -> int:
    """+1 when larger values are better, -1 otherwise: multiply a difference by it so positive = better."""
    return 1 if higher_is_better(df, metric) else -1


def apply_where(df: pd.DataFrame, clauses: list[str]) -> pd.DataFrame:
    """Keep rows matching every `column=value` clause; `value` may list alternatives (`bits=3,4`)."""
    for clause in clauses:
        col, sep, value = clause.partition("=")
        if not sep or not col:
            raise UserError(f"--where '{clause}' is not column=value")
        if col not in df.columns:
            raise UserError(f"--where: unknown column '{col}'; valid: {', '.join(df.columns)}")
        df = df[_matches(df[col], value)]
    return df


def _matches(col: pd.Series, value: str) -> pd.Series:
    # The whole value first: a stage list ("magnitude,rtn") contains commas itself.
    options = [value, *value.split(",")]
    hit = col.astype(str).isin(options)
    numbers = pd.to_numeric(pd.Series(options), errors="coerce").dropna()
    return hit | pd.to_numeric(col, errors="coerce").isin(numbers)


def node_values(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Successful rows of one metric with `n_stages`, `role` (dense/single/full/partial) and appearance rank."""
    rows = df[(df["status"] == "ok") & (df["metric"] == metric)].copy()
    if rows.empty:
        present = ", ".join(sorted(set(df["metric"].dropna()))) or "none"
        raise UserError(f"no successful rows for metric '{metric}'; metrics present: {present}")
    rows["n_stages"] = rows["stages"].str.split(",").str.len()
    rows["role"] = np.select(
        [rows["depth"] == 0, rows["depth"] == rows["n_stages"], rows["depth"] == 1],
        ["dense", "full", "single"],
        "partial",
    )
    rows["rank"] = np.arange(len(rows))  # the trie writes the stage-list order first
    return rows


def is_sequential(order: str, stages: str) -> bool:
    """A full order made of the stage list itself (a joint one-pass node is not)."""
    return sorted(order.split(" > ")) == sorted(stages.split(","))


# --- naming orders across stage lists ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StageInfo:
    kind: str  # 'prune', 'quantize' or 'joint'
    calibrated: bool  # reads calibration statistics: its result depends on the seed


# What each label's stage is, learned from the results' `stage_list` column (the stages as the run recorded them).
STAGES: dict[str, StageInfo] = {}


def learn_stages(df: pd.DataFrame) -> None:
    """Remember each label's kind and calibration from the `stage_list` column (runs written before it have none:
    their labels are traced through conf/stage/ instead). Where runs gave one label to different stages, the first
    wins."""
    if "stage_list" not in df.columns:
        return
    for js in df["stage_list"].dropna().unique():
        for st in json.loads(js):
            STAGES.setdefault(st["label"], StageInfo(str(st["kind"]), bool(st["calibrated"])))
    stage_info.cache_clear()


@lru_cache(maxsize=None)
def stage_info(label: str) -> StageInfo | None:
    """What a label's stage is: recorded in the results, else (older runs) the class a conf/stage file names;
    None if neither."""
    if label in STAGES:
        return STAGES[label]
    entry = stage_files().get(label.split("(")[0])
    if entry is None:
        return None
    from hydra.utils import get_class

    cls = get_class(entry.target)
    return StageInfo(str(cls.kind), getattr(cls, "needs", None) is not None)


def stage_kind(label: str) -> str:
    """'prune', 'quantize' or 'joint' for a label naming a conf/stage file ('' for custom labels)."""
    info = stage_info(label)
    return info.kind if info is not None else ""


def seed_dependent(order: str) -> bool:
    """Whether a node's result depends on the calibration seed: some stage of it `needs` calibration statistics.

    A custom label cannot be traced to its stage here, so it counts as seed-dependent (the cautious reading).
    """
    if order == "dense":
        return False
    infos = [stage_info(lab) for lab in order.split(" > ")]
    return any(info is None or info.calibrated for info in infos)


def order_pattern(order: str, stages: str) -> str:
    """An order in words that compare across stage lists: `prune > quantize` when the stages' kinds are distinct,
    else positions in the stage list (`s2 > s1`); dense and single stages keep their names."""
    labels = stages.split(",")
    kinds = [stage_kind(lab) for lab in labels]
    if " > " not in order and order not in labels:  # dense or a joint node
        return order if order == "dense" else (stage_kind(order) or order)
    if all(kinds) and len(set(kinds)) == len(kinds):
        names = dict(zip(labels, kinds))
    else:
        names = {lab: f"s{labels.index(lab) + 1}" for lab in labels}
    return " > ".join(names[lab] for lab in order.split(" > "))


# --- the table ---------------------------------------------------------------------------------------------------


def order_table(
    df: pd.DataFrame, metric: str, dense: bool = False, singles: bool = False, names: str = "auto"
) -> tuple[pd.DataFrame, str]:
    """Settings × orders table of `metric` (mean over seeds) and a one-line caption saying how to read it.

    `names`: "label" keeps order labels as columns, "pattern" uses order_pattern, "auto" labels when every row
    has the same stage list. Beside the orders: `best` (the winning full order) and, with exactly two full-order
    columns, `A` = the first column's advantage (positive: first is better), else `spread` = best − worst.
    """
    nodes = node_values(df, metric)
    keep = {"dense": dense, "single": singles, "full": True, "partial": False}
    nodes = nodes[nodes["role"].map(keep)]
    if names == "auto":
        names = "label" if nodes["stages"].nunique() == 1 else "pattern"
    if names == "pattern":
        nodes["column"] = [order_pattern(o, s) for o, s in zip(nodes["order"], nodes["stages"])]
    else:
        nodes["column"] = nodes["order"]
    role_rank = nodes["role"].map({"dense": 0, "single": 1, "full": 2})
    columns = nodes.assign(r=role_rank).sort_values(["r", "rank"])["column"].drop_duplicates().tolist()
    full_cols = nodes.loc[nodes["role"] == "full", "column"].drop_duplicates().tolist()

    index = [
        c
        for c in TABLE_INDEX
        if nodes[c].notna().any() and not (c in IMPLIED and (nodes[c].dropna() == IMPLIED[c]).all())
    ]
    table = nodes.pivot_table(index=index, columns="column", values="value", aggfunc="mean", dropna=False)
    table = table.reindex(columns=columns).dropna(how="all")
    d = direction(df, metric)
    scores = table[full_cols] * d
    winners = scores.eq(scores.max(axis=1), axis=0).sum(axis=1)
    if not full_cols:  # dense and singles only (predict_only runs): no order to rank
        table["best"] = None
        how = "no full order in these runs (predict_only, or not finished)"
    else:
        table["best"] = scores.fillna(-np.inf).idxmax(axis=1).where(winners == 1, np.where(winners > 1, "tie", None))
        if len(full_cols) == 2:
            table["A"] = scores[full_cols[0]] - scores[full_cols[1]]
            how = f"A = advantage of '{full_cols[0]}' over '{full_cols[1]}' (positive: the first is better)"
        else:
            table["spread"] = scores.max(axis=1) - scores.min(axis=1)
            how = "spread = best − worst full order"
    seeds = nodes.groupby(index)["seed"].nunique()
    if (seeds > 1).any():
        table["n_seeds"] = seeds
        how += "; values are means over seeds"
    arrow = "↑" if d > 0 else "↓"
    caption = f"{metric} ({arrow} better) per order; {how}"
    table.columns.name = None
    return table.reset_index(), caption


def render(table: pd.DataFrame, fmt: str, caption: str = "", floatfmt: str = ".4g") -> str:
    if fmt == "markdown":
        head = f"{caption}\n\n" if caption else ""
        return head + table.to_markdown(index=False, floatfmt=floatfmt) + "\n"
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "latex":
        caption = "".join(LATEX_SPECIALS.get(ch, ch) for ch in caption)
        text = table.to_latex(
            index=False, float_format=lambda v: format(v, floatfmt), caption=caption or None, na_rep="--", escape=True
        )
        for plain, tex in LATEX_SYMBOLS.items():  # characters that plain LaTeX fonts do not have
            text = text.replace(plain, tex)
        return text
    raise UserError(f"--format {fmt} is unknown; valid: {', '.join(FORMATS)}")
