"""The analysis commands' argument parsing and output: `compress-order table | analyze | collect | frontier | best`.

compress-order collect outputs/multirun/2025-01-01/12-00-00 --out all.parquet
compress-order table outputs/multirun/... --metric perplexity --where bits=4 --format latex --out t.tex
compress-order analyze outputs/multirun/... --out-dir report/
compress-order frontier outputs/multirun/... --x size_bytes --format csv --out report/
compress-order best outputs/multirun/... --max-size 1.2GB
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from compress_order.analysis import bootstrap, collect, frontier
from compress_order.analysis.report import write_report
from compress_order.analysis.tables import apply_where, direction, order_table, primary_metric, render
from compress_order.core.errors import UserError
from compress_order.core.registry import Registry
from compress_order.core.schema import SIMULATED

DESCRIPTION = (
    "`compress-order table | analyze | collect | frontier | best`: from the tidy rows of runs to tables and figures."
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as UserError (one line, exit 2 from the CLI), not its own exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _count(text: str) -> int:
    """A whole number ≥ 0 (bootstrap resamples; 0: none)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; give 0 (no intervals) or more resamples")
    return n


def _budget(text: str) -> float:
    """A number > 0 (a budget of bits or milliseconds)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: '{text}'") from None
    if not x > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not a budget; give a number > 0")
    return x


def _parser(cmd: str) -> _Parser:
    p = _Parser(prog=f"compress-order {cmd}", description=DESCRIPTION)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, multirun folders or collected files")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COL=VALUE",
        help="keep rows where COL equals VALUE (or one of VALUE,VALUE); repeatable",
    )
    if cmd == "collect":
        p.add_argument("--out", default="collected.parquet", help="output file, .parquet or .csv")
        return p
    p.add_argument("--metric", help="metric to compare (default: perplexity if present, else top1)")
    if cmd in ("frontier", "best"):
        p.add_argument("--backend", default=SIMULATED, help=f"backend whose latency_ms is read (default: {SIMULATED})")
        p.add_argument("--n-boot", type=_count, default=1000, help="bootstrap resamples (0: no intervals)")
    if cmd == "frontier":
        p.add_argument("--x", default="size_bytes", choices=frontier.COSTS, help="the cost axis")
        p.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
        p.add_argument("--out", metavar="DIR", help="where the table and figure go (default: PATH/analysis)")
        p.add_argument("--no-plots", action="store_true")
        return p
    if cmd == "best":
        p.add_argument("--max-size", metavar="SIZE", help="size budget: 500MB, 1.2GB, 800kB, 2GiB or bytes")
        p.add_argument("--max-bits", type=_budget, metavar="BITS", help="average packed bits per weight")
        p.add_argument("--max-latency-ms", type=_budget, metavar="MS", help="latency_ms of --backend")
        return p
    if cmd == "table":
        p.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
        p.add_argument("--out", help="write the table to this file instead of printing it")
        p.add_argument("--dense", action="store_true", help="add the dense baseline column")
        p.add_argument("--singles", action="store_true", help="add a column per stage applied alone")
        p.add_argument(
            "--names",
            default="auto",
            choices=["auto", "label", "pattern"],
            help="order columns by label, or by kind/position to compare across stage lists",
        )
    else:
        p.add_argument("--out-dir", help="where tables and figures go (default: PATH/analysis)")
        p.add_argument("--n-boot", type=_count, default=1000, help="bootstrap resamples (0: no intervals)")
        p.add_argument("--no-plots", action="store_true")
    return p


def main(cmd: str, args: list[str]) -> int:
    try:
        ns = _parser(cmd).parse_args(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    _check_outputs(cmd, ns)
    df = apply_where(collect.collect(ns.paths), ns.where)
    if df.empty:
        raise UserError("no rows left after --where " + " ".join(ns.where))
    return HANDLERS.lookup(cmd)(df, ns)


def _output_dir(ns: argparse.Namespace, given: str | None) -> Path:
    """Where analyze and frontier write: the folder given, else PATH/analysis (beside a collected file)."""
    first = Path(ns.paths[0])
    return Path(given) if given else (first if first.is_dir() else first.parent) / "analysis"


def _check_outputs(cmd: str, ns: argparse.Namespace) -> None:
    """What a command will write can be written, before any rows are read: one line, not a traceback at the end."""
    from compress_order.core.files import check_writable

    if cmd == "collect" and Path(ns.out).suffix not in (".parquet", ".csv"):
        raise UserError(f"--out {ns.out}: use a .parquet or .csv file name")
    if cmd == "best" and ns.max_size is not None and not frontier.parse_size(ns.max_size) > 0:
        raise UserError(f"--max-size {ns.max_size} is not a budget; give a size > 0, e.g. 1.2GB")
    if cmd in ("collect", "table") and ns.out:
        if Path(ns.out).is_dir():
            raise UserError(f"--out {ns.out} is a folder; give a file name")
        check_writable(str(Path(ns.out).expanduser().absolute().parent), f"--out {ns.out}: its folder")
    elif cmd == "analyze":
        check_writable(str(_output_dir(ns, ns.out_dir)), "--out-dir" if ns.out_dir else "the analysis folder")
    elif cmd == "frontier":
        check_writable(str(_output_dir(ns, ns.out)), "--out" if ns.out else "the analysis folder")


def _collect(df: pd.DataFrame, ns: argparse.Namespace) -> int:
    out = Path(ns.out)
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
    out_dir = _output_dir(ns, ns.out_dir)
    text = write_report(df, out_dir, metric=ns.metric, n_boot=ns.n_boot, plots=not ns.no_plots)
    print(f"{collect.describe(df)}\n\n{text}", end="")
    return 0


def _frontier(df: pd.DataFrame, ns: argparse.Namespace) -> int:
    metric = ns.metric or primary_metric(df)
    pts = frontier.frontier(frontier.nodes(df, metric, ns.backend), ns.x)
    table, caption = frontier.frontier_table(pts, ns.x, metric, direction(df, metric) > 0)
    text = render(table, ns.format, caption)
    print(text, end="")
    out_dir = _output_dir(ns, ns.out)
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
    budgets = {
        cost: limit
        for cost, limit in (
            ("size_bytes", None if ns.max_size is None else frontier.parse_size(ns.max_size)),
            ("avg_bits", ns.max_bits),
            ("latency_ms", ns.max_latency_ms),
        )
        if limit is not None
    }
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
        raise UserError(
            f"no node meets {frontier.budget_text(budgets)}; the smallest is '{small['order']}' "
            f"({small['stages']}) at {frontier.format_size(small['size_bytes'])}, "
            f"{small['avg_bits']:.3g} bits/weight"
        )
    arrow = "higher" if direction(df, metric) > 0 else "lower"
    lines = [
        f"budget: {frontier.budget_text(budgets)}; {metric} ({arrow} is better)"
        + (", 95% intervals over evaluation windows (and seeds where several)" if ns.n_boot > 0 else "")
    ]
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
        return (
            f"not distinguishable from the best ({ci}: the interval covers 0)"
            if lo <= 0 <= hi
            else f"distinguishable: worse than the best ({ci})"
        )
    return {
        None: "no intervals (no per-unit samples) to tell them apart",
        True: "not distinguishable from the best (their intervals overlap; unpaired: no shared evaluation units)",
        False: "worse than the best (their intervals do not overlap)",
    }[frontier.overlap(best, runner)]


def _with_intervals(df: pd.DataFrame, pts: pd.DataFrame, metric: str, n_boot: int) -> pd.DataFrame:
    """`pts` with each node's interval over windows and seeds (`low`, `high`; NaN without samples)."""
    keys = pts[frontier.NODE]
    rows = df.merge(keys, on=frontier.NODE, how="inner")
    ci = bootstrap.node_intervals(rows, metric, n_boot, roles=("dense", "single", "partial", "full"))
    return pts.merge(ci[[*frontier.NODE, "low", "high"]], on=frontier.NODE, how="left")


# The five commands, by the names compress_order.cli.main dispatches (its ANALYSIS_COMMANDS, which must not import
# this module to start: tests/test_registry.py keeps the two equal).
HANDLERS: Registry[Callable[[pd.DataFrame, argparse.Namespace], int]] = Registry("analysis command")
for _name, _handler in {
    "collect": _collect,
    "table": _table,
    "analyze": _analyze,
    "frontier": _frontier,
    "best": _best,
}.items():
    HANDLERS.register(_name, _handler)
