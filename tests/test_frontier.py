"""Decision maps: Pareto frontiers, budget queries and their errors, on hand-built result frames and run folders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import write_fake_run

from compress_order.cli import main as cli
from compress_order.analysis import collect, frontier
from compress_order.analysis.report import write_report
from compress_order.core.errors import UserError
from compress_order.evaluation.metrics import METRICS
from compress_order.core.schema import COLUMNS

STAGES = "magnitude,rtn"


def node(ctx: dict, order: str, key: str, metrics: dict[str, float]) -> list[dict]:
    """The rows of one node as the runner writes them: one per metric, all under one node_key."""
    depth = 0 if order == "dense" else len(order.split(" > "))
    return [{**{c: None for c in COLUMNS}, "run_id": "r", **ctx, "order": order, "depth": depth, "metric": m,
             "value": float(v), "higher_is_better": METRICS[m].higher_is_better, "backend": "dense-simulated",
             "status": "ok", "error": "", "node_key": key, "timestamp": "t"} for m, v in metrics.items()]  # fmt: skip


def grid_frame() -> pd.DataFrame:
    """Two settings (sparsity 0.3 and 0.5, 3 bits) sharing dense and rtn alone; perplexity (lower is better).

    size (kB) / perplexity:  dense 100/5.0, magnitude(0.3) 80/5.5, magnitude(0.5) 60/6.5, rtn 30/6.0,
    magnitude > rtn 0.3: 25/6.2 and 0.5: 20/7.0, rtn > magnitude 0.3: 25/6.2 (tie with magnitude > rtn),
    rtn > magnitude 0.5: 20/7.5 (dominated by the same-size magnitude > rtn).
    """
    rows = []
    values = {
        0.3: {"magnitude": (80, 5.5), "magnitude > rtn": (25, 6.2), "rtn > magnitude": (25, 6.2)},
        0.5: {"magnitude": (60, 6.5), "magnitude > rtn": (20, 7.0), "rtn > magnitude": (20, 7.5)},
    }
    for sparsity, own in values.items():
        ctx = dict(model="m", dataset="d", stages=STAGES, bits=3, sparsity=sparsity, group_size=128, seed=0)
        shared = {"dense": ("k-dense", 100, 5.0), "rtn": ("k-rtn3", 30, 6.0)}
        for order, (key, kb, ppl) in shared.items():
            rows += node(ctx, order, key, {"perplexity": ppl, "size_bytes": kb * 1000, "avg_bits": kb / 10})
        for order, (kb, ppl) in own.items():
            rows += node(ctx, order, f"k-{order}-{sparsity}",
                         {"perplexity": ppl, "size_bytes": kb * 1000, "avg_bits": kb / 10})  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def test_pareto_mask_dominance_and_ties():
    cost = [1, 2, 2, 3, 3, 4, 5, np.nan]
    score = [1, 3, 2, 3, 4, 4, 6, 9]
    # (2,2) is beaten at equal cost; (3,3) by (2,3) at lower cost with an equal score; (4,4) by (3,4) likewise
    assert frontier.pareto_mask(cost, score).tolist() == [True, True, False, False, True, False, True, False]
    # exact ties in both are all kept
    assert frontier.pareto_mask([1, 1, 2], [5, 5, 5]).tolist() == [True, True, False]


def test_frontier_of_hand_built_grid_pools_shared_nodes():
    pts = frontier.frontier(frontier.nodes(grid_frame(), "perplexity"), "size_bytes")
    assert len(pts) == 8  # dense and rtn alone are one node each, not one per setting
    on = pts[pts["frontier"]]
    got = sorted(zip(on["order"], on["sparsity"], on["size_bytes"], on["value"]))
    assert got == [("dense", 0.3, 100_000, 5.0), ("magnitude", 0.3, 80_000, 5.5),
                   ("magnitude > rtn", 0.3, 25_000, 6.2), ("magnitude > rtn", 0.5, 20_000, 7.0),
                   ("rtn", 0.3, 30_000, 6.0), ("rtn > magnitude", 0.3, 25_000, 6.2)]  # fmt: skip
    assert set(pts.loc[~pts["frontier"], "value"]) == {6.5, 7.5}
    table, caption = frontier.frontier_table(pts, "size_bytes", "perplexity", higher_is_better=False)
    assert "6 of 8 distinct nodes" in caption
    assert table["size_bytes"].tolist() == sorted(table["size_bytes"].tolist())
    dense = table[table["order"] == "dense"].iloc[0]
    assert (dense["pattern"], dense["bits"], dense["sparsity"]) == ("dense", "", "")  # no settings shape dense
    rtn = table[table["order"] == "rtn"].iloc[0]
    assert (rtn["pattern"], rtn["bits"], rtn["sparsity"]) == ("single", "3", "")
    assert set(table["pattern"]) == {"dense", "single", "prune > quantize", "quantize > prune"}


def test_frontier_pools_seeds_before_ranking():
    df = grid_frame()
    other = df.assign(seed=1)
    # a second seed where magnitude > rtn at 0.5 is much worse: its mean (7.0 + 9.0) / 2 = 8.0 loses to rtn > magnitude
    hit = (other["order"] == "magnitude > rtn") & (other["sparsity"] == 0.5) & (other["metric"] == "perplexity")
    other.loc[hit, "value"] = 9.0
    pts = frontier.frontier(frontier.nodes(pd.concat([df, other]), "perplexity"), "size_bytes")
    at20 = pts[pts["size_bytes"] == 20_000].set_index("order")
    assert at20.loc["magnitude > rtn", "value"] == 8.0 and at20.loc["magnitude > rtn", "n_seeds"] == 2
    assert at20["frontier"].to_dict() == {"rtn > magnitude": True, "magnitude > rtn": False}


def test_backend_named_without_its_dtype(capsys):
    """Backend rows carry their dtype (`int4_weight_only(bf16)`): the name before the parenthesis still selects
    them; an unknown name, or one that fits rows of two dtypes, is one line naming the choices."""
    df = grid_frame()
    lat = df[df["metric"] == "size_bytes"].assign(metric="latency_ms", value=1.0)
    df = pd.concat([df, lat.assign(backend="int4_weight_only(bf16)"), lat.assign(backend="dense(bf16)", value=2.0)])
    pts = frontier.nodes(df, "perplexity", "int4_weight_only")
    assert (pts["latency_ms"] == 1.0).all()
    assert (frontier.nodes(df, "perplexity", "int4_weight_only(bf16)")["latency_ms"] == 1.0).all()
    with pytest.raises(UserError, match=r"^--backend int8_weight_only: no successful rows of it; backends present: "
                       r"dense\(bf16\), dense-simulated, int4_weight_only\(bf16\)$"):  # fmt: skip
        frontier.nodes(df, "perplexity", "int8_weight_only")
    two = pd.concat([df, lat.assign(backend="int4_weight_only(fp16)")])
    with pytest.raises(UserError, match=r"ambiguous: int4_weight_only\(bf16\), int4_weight_only\(fp16\)"):
        frontier.nodes(two, "perplexity", "int4_weight_only")


def test_parse_size():
    assert frontier.parse_size("500MB") == 500e6
    assert frontier.parse_size("1.2GB") == pytest.approx(1.2e9)
    assert frontier.parse_size("800kB") == 800e3
    assert frontier.parse_size("2GiB") == 2 * 2**30
    assert frontier.parse_size("123456") == 123456
    for bad in ("1.2 parsecs", "GB", "-5MB", "1,2GB"):
        with pytest.raises(UserError, match="valid units: B, kB, MB, GB"):
            frontier.parse_size(bad)


# --- the commands on run folders -----------------------------------------------------------------------------


def write_run(run_dir, shifts: dict[str, float], sizes: dict[str, float], n_units: int = 200,
              noise: float = 0.02, draw: int = 0, **setting) -> None:  # fmt: skip
    """A finished run folder: perplexity from per-window NLLs (base + shift per order + noise drawn with seed
    `draw`) and each node's size."""
    ctx = {**dict(model="m", dataset="d", stages=STAGES, bits=3, sparsity=0.5, group_size=128, seed=0), **setting}
    rng = np.random.default_rng(draw)
    base = rng.normal(2.0, 0.4, n_units)
    results, samples = [], []
    for order, shift in shifts.items():
        nll = base + shift + rng.normal(0, noise, n_units)
        key = f"k-{order}-{ctx['bits']}-{ctx['sparsity']}"
        results += node(ctx, order, key, {"perplexity": np.exp(nll.mean()), "size_bytes": sizes[order],
                                          "avg_bits": 16 * sizes[order] / sizes["dense"]})  # fmt: skip
        samples.append(pd.DataFrame({"order": order, "node_key": key, "metric": "nll", "unit": np.arange(n_units),
                                     "value": nll}))  # fmt: skip
    write_fake_run(run_dir, results, samples)


SIZES = {"dense": 4e9, "magnitude": 2e9, "rtn": 1.1e9, "magnitude > rtn": 0.6e9, "rtn > magnitude": 0.6e9}


def test_best_names_the_winner_and_an_indistinguishable_runner_up(tmp_path, capsys):
    # the two orders differ by 0.001 nats per window, their windows by noise of sd 0.3: the difference of the means
    # has an sd of 0.03, far more than 0.001
    run = tmp_path / "close"
    write_run(run, {"dense": 0.0, "magnitude": 0.3, "rtn": 0.1, "magnitude > rtn": 0.400, "rtn > magnitude": 0.401},
              SIZES, noise=0.3, draw=1)  # fmt: skip
    assert cli.main(["best", str(run), "--max-size", "1GB", "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "2 of 5 distinct nodes fit" in out
    best, runner = (ln for ln in out.splitlines() if ln.strip().startswith(("best:", "runner-up:")))
    assert {best.split()[1], runner.split()[1]} == {"magnitude", "rtn"}  # the two orders, whichever is ahead
    assert "> rtn [prune > quantize" in best + runner and "> magnitude [quantize > prune" in best + runner
    assert "600 MB" in best and "paired over the same units" in out
    assert "not distinguishable from the best" in out
    # a larger budget admits rtn alone (1.1 GB), clearly better than both orders
    assert cli.main(["best", str(run), "--max-size", "1.2GB", "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "best:      rtn [single" in out and "distinguishable: worse than the best (the best's advantage" in out
    # a bits budget: 16 · 1.1/4 = 4.4 bits for rtn alone
    assert cli.main(["best", str(run), "--max-bits", "4.4", "--n-boot", "0"]) == 0
    out = capsys.readouterr().out
    assert "best:      rtn [single" in out and "no intervals" in out


def test_best_budget_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, {o: 0.1 * i for i, o in enumerate(SIZES)}, SIZES)
    cases = {
        ("--max-size", "1.2XB"): "unknown unit 'XB'; valid units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB",
        ("--max-size", "100MB"): "no node meets size_bytes ≤ 100 MB; the smallest is 'magnitude > rtn' "
                                 "(magnitude,rtn) at 600 MB",
        ("--max-bits", "lots"): "argument --max-bits: invalid float value",
        (): "give a budget: --max-size SIZE, --max-bits BITS or --max-latency-ms MS",
        ("--max-latency-ms", "20"): "no successful 'latency_ms' rows",
    }  # fmt: skip
    for args, message in cases.items():
        assert cli.main(["best", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("compress-order: error:") and message in err, err


def test_frontier_command_writes_table_nodes_and_figure(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, {"dense": 0.0, "magnitude": 0.3, "rtn": 0.1, "magnitude > rtn": 0.4, "rtn > magnitude": 0.5},
              SIZES)  # fmt: skip
    out_dir = tmp_path / "maps"
    assert cli.main(["frontier", str(run), "--format", "csv", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out_dir / "frontier.csv")
    assert printed.startswith(table.to_csv(index=False)[:40])
    # rtn > magnitude ties magnitude > rtn on size and is worse: the only dominated node
    assert table["order"].tolist() == ["magnitude > rtn", "rtn", "dense"]
    nodes = pd.read_csv(out_dir / "frontier_nodes.csv")
    assert len(nodes) == 5 and nodes["frontier"].sum() == 3
    assert (out_dir / "frontier_size_bytes.png").stat().st_size > 0
    assert cli.main(["frontier", str(run), "--x", "avg_bits", "--format", "latex", "--out", str(out_dir),
                     "--no-plots"]) == 0  # fmt: skip
    tex = (out_dir / "frontier.tex").read_text()
    assert r"against avg\_bits" in tex and r"$\leq$" in tex and r"magnitude $\rightarrow$ rtn" in tex
    assert tex.count(r"\\") == 1 + 3  # the header and the three frontier points
    capsys.readouterr()
    assert cli.main(["frontier", str(run), "--x", "latency_ms"]) == 2
    assert "no successful 'latency_ms' rows" in capsys.readouterr().err
    assert cli.main(["frontier", str(run), "--x", "latency_ms", "--backend", "torchao-int4"]) == 2
    err = capsys.readouterr().err
    assert "--backend torchao-int4: no successful rows of it; backends present: dense-simulated" in err
    assert cli.main(["frontier", str(run), "--x", "flops"]) == 2
    assert "invalid choice: 'flops'" in capsys.readouterr().err


def test_order_map_has_one_cell_per_grid_point(tmp_path):
    """A 2 × 3 bits × sparsity grid: magnitude first wins clearly at 3 bits; at 4 bits the two orders give the
    same windows (a tie: no winner, not significant). rtn alone is the weaker stage everywhere, so the PIH predicts
    rtn first."""
    root = tmp_path / "sweep"
    for job, (bits, sparsity) in enumerate((b, s) for b in (3, 4) for s in (0.3, 0.5, 0.7)):
        gap, noise = (0.2, 0.02) if bits == 3 else (0.0, 0.0)
        write_run(root / str(job), {"dense": 0.0, "magnitude": 0.3, "rtn": 0.1, "magnitude > rtn": 0.5,
                                    "rtn > magnitude": 0.5 + gap}, SIZES, noise=noise, bits=bits,
                  sparsity=sparsity)  # fmt: skip
    out_dir = tmp_path / "report"
    write_report(collect.collect([root]), out_dir, n_boot=200)
    cells = pd.read_csv(out_dir / "order_map.csv")
    assert sorted(zip(cells["bits"], cells["sparsity"])) == [(b, s) for b in (3, 4) for s in (0.3, 0.5, 0.7)]
    by_bits = cells.set_index("bits")
    assert (by_bits.loc[3, "winner"] == "magnitude > rtn").all() and by_bits.loc[3, "significant"].all()
    assert (by_bits.loc[4, "winner"] == "tie").all() and (by_bits.loc[4, "A"] == 0).all()
    assert not by_bits.loc[4, "significant"].any()
    assert ((cells["A_low"] <= cells["A"]) & (cells["A"] <= cells["A_high"])).all()
    assert (cells["predicted"] == "rtn > magnitude").all()
    assert (by_bits.loc[3, "agree"] == False).all() and by_bits.loc[4, "agree"].isna().all()  # noqa: E712
    assert (out_dir / "order_map.png").stat().st_size > 0


def test_frontier_and_best_on_a_real_tiny_grid(tiny_overrides, tmp_path, capsys):
    """A 2-job sweep of the tiny LLaMA (bits 3 and 4): dense and magnitude alone are shared by both jobs, so the
    grid has 8 distinct nodes; the frontier and the best node agree with a brute-force reading of the rows."""
    over = [o for o in tiny_overrides if not o.startswith("hydra.run.dir")]
    assert cli.main(["run", "-m", *over, "bits=3,4", "eval.backends=none"]) == 0
    sweep = tmp_path / "sweep"
    out_dir = tmp_path / "maps"
    assert cli.main(["frontier", str(sweep), "--out", str(out_dir), "--no-plots"]) == 0
    pts = pd.read_csv(out_dir / "frontier_nodes.csv")
    assert len(pts) == 8 and (pts["order"] == "dense").sum() == 1 and (pts["order"] == "magnitude").sum() == 1
    # brute force: a node is on the frontier iff no other is at ≤ size with ≤ perplexity, one of them strictly
    size, ppl = pts["size_bytes"].to_numpy(), pts["value"].to_numpy()
    dominated = [any(size[j] <= size[i] and ppl[j] <= ppl[i] and (size[j] < size[i] or ppl[j] < ppl[i])
                     for j in range(len(pts))) for i in range(len(pts))]  # fmt: skip
    assert pts["frontier"].tolist() == [not d for d in dominated]
    rows = collect.collect([sweep])
    ok = rows[(rows["status"] == "ok") & (rows["metric"] == "perplexity")]
    assert set(pts["value"].round(9)) == set(ok["value"].round(9))  # every node's own value, none lost
    budget = int(np.median(size))
    capsys.readouterr()
    assert cli.main(["best", str(sweep), "--max-size", str(budget), "--n-boot", "100"]) == 0
    out = capsys.readouterr().out
    fit = pts[pts["size_bytes"] <= budget].sort_values("value")
    assert f"{len(fit)} of 8 distinct nodes fit" in out
    best_line = next(ln for ln in out.splitlines() if "best:" in ln)
    assert f"best:      {fit['order'].iloc[0]} [" in best_line and f"perplexity {fit['value'].iloc[0]:.4g}" in best_line
    # the jobs share the dense node, so any two nodes of the sweep were evaluated on the same windows
    assert "paired over the same units" in out


def test_best_without_shared_units_compares_intervals(tmp_path, capsys):
    """Two runs that share no node (their node_keys differ): the runner-up is judged by interval overlap."""
    shifts = {"dense": 0.0, "magnitude": 0.3, "rtn": 0.1, "magnitude > rtn": 0.4, "rtn > magnitude": 0.5}
    write_run(tmp_path / "a", shifts, SIZES, bits=3)
    write_run(tmp_path / "b", shifts, SIZES, bits=4)
    assert cli.main(["best", str(tmp_path / "a"), str(tmp_path / "b"), "--max-size", "5GB", "--n-boot", "100"]) == 0
    out = capsys.readouterr().out
    assert "10 of 10 distinct nodes fit" in out and out.count("dense [dense") == 2
    assert "their intervals overlap; unpaired: no shared evaluation units" in out


ANALYSIS_COMMANDS = {
    "table": [], "analyze": ["--n-boot", "0", "--no-plots"], "collect": [], "frontier": ["--no-plots"],
    "best": ["--max-size", "1.2GB", "--n-boot", "0"],
}  # fmt: skip


@pytest.mark.parametrize("cmd", ANALYSIS_COMMANDS)
def test_unreadable_results_one_error_alone_a_warning_beside_readable_runs(cmd, tmp_path, capsys):
    shifts = {o: 0.1 * i for i, o in enumerate(SIZES)}
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        write_run(sweep / job, shifts, SIZES, bits=3 + int(job))
    bad = sweep / "1" / "results.parquet"
    bad.write_bytes(bad.read_bytes()[:100])  # a job killed while writing it
    extra = ANALYSIS_COMMANDS[cmd]
    out_args = ["--out", str(tmp_path / "all.parquet")] if cmd == "collect" else []
    # nothing readable: one error line naming the file, no warning about it first
    assert cli.main([cmd, str(sweep / "1"), *extra, *out_args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compress-order: error: no readable results: 1 unreadable file(s): "
                                               f"'{bad}' ("), err  # fmt: skip
    # beside a readable run: a warning for the unreadable one, and the command answers
    assert cli.main([cmd, str(sweep), *extra, *out_args]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [line for line in err if "warning" in line] and len(err) == 1 and f"'{bad}'" in err[0], err
