"""Check compress-order's CUDA paths on an offline GPU node, from a wheelhouse made by `make wheelhouse`.

    python scripts/gpu_check.py [--wheelhouse wheelhouse] [--out gpu_check] [--budget 480] [--only NAME ...]

1. Installs every wheel of the wheelhouse with no network into a private folder (`<out>/site`, put on
   PYTHONPATH after the checkout), never over the node's own packages.
2. Stops with one line and exit 2 when torch sees no CUDA device.
3. Runs the checks of scripts/gpu_checks.py, each in its own process with its own timeout, all within one
   budget, and rewrites `<out>/report.md` and `<out>/report.json` after every check, so a run cut short keeps
   the results before it. Exit 0 only if every check passed; 1 otherwise.

Only the standard library is imported here: the dependencies exist only after the install step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480  # the whole check: 8 minutes
STATUSES = ("passed", "failed", "skipped", "timed out")
RESULT_ENV = "GPU_CHECK_RESULT"  # where a check process writes its status, reason and figures


class CheckError(Exception):
    """Bad input or no CUDA device: one line, exit 2."""


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    argv: list[str]  # the process that runs the check
    timeout_s: float


@dataclass
class Result:
    name: str
    title: str
    status: str  # one of STATUSES, or "running" while it runs
    reason: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    log: str = ""


# name, title, own timeout (s). The first six timeouts add up to the 8-minute budget; the large model gets the most,
# as its GPTQ and SparseGPT passes over 154 layers dominate. The float kernels' check, last, runs in what the
# others leave of it (they seldom use their whole timeouts), and is skipped when nothing is left.
CHECKS: list[tuple[str, str, float]] = [
    ("cuda_tests", "the test-suite's CUDA tests on the GPU", 45),
    ("end_to_end", "char-LLaMA end to end on cuda vs the CPU reference", 75),
    ("calibration_device", "device=cpu calibration.device=cuda vs all-GPU", 45),
    ("half_precision", "fp16 and bf16 models beside fp32", 75),
    ("packed_backends", "packed backends on CUDA: logits and speed-up", 60),
    ("large_model", "a ~1B-parameter random LLaMA: GPTQ, SparseGPT, 32-window evaluation", 180),
    ("float_kernels", "FP8 / MXFP4 / NVFP4 matmuls (torch._scaled_mm, torchao) on our grids", 30),
]


def default_checks(python: str) -> list[Check]:
    script = str(ROOT / "scripts" / "gpu_checks.py")
    return [Check(name, title, [python, script, name], timeout) for name, title, timeout in CHECKS]


def _kill_group(proc: subprocess.Popen) -> None:
    """A check may start its own processes (pytest, compress-order): end the whole group it leads."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_check(check: Check, timeout_s: float, out: Path, env: dict[str, str]) -> Result:
    """Run one check's process under `timeout_s`; its log goes to <out>/logs/<name>.log."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log, result_file = logs / f"{check.name}.log", out / "results" / f"{check.name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(check.argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**env, RESULT_ENV: str(result_file)})  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    seconds = round(time.monotonic() - t0, 1)
    got = json.loads(result_file.read_text()) if result_file.is_file() else {}
    res = Result(check.name, check.title, "failed", seconds=seconds, figures=got.get("figures", {}),
                 log=str(log.relative_to(out)))  # fmt: skip
    if rc is None:
        res.status, res.reason = "timed out", f"cut off after {timeout_s:.0f} s"
    elif got.get("status") in STATUSES and (rc == 0 or got["status"] != "passed"):
        res.status, res.reason = got["status"], got.get("reason", "")
    else:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        res.reason = f"exit code {rc}: {tail[0][:300]}"
    return res


def run_checks(checks: list[Check], budget_s: float, out: Path, env: dict[str, str], header: dict,
               on_result: Callable[[Result], None] = lambda r: None) -> list[Result]:  # fmt: skip
    """Every check in turn, each under min(its timeout, what is left of the budget); the reports are rewritten
    before and after each check."""
    start = time.monotonic()
    results = [Result(c.name, c.title, "skipped", "not reached") for c in checks]
    for i, check in enumerate(checks):
        left = budget_s - (time.monotonic() - start)
        if left < 1:
            results[i].reason = f"the {budget_s:.0f} s budget was spent"
            continue
        results[i] = Result(check.name, check.title, "running")
        write_report(out, header, results)
        results[i] = run_check(check, min(check.timeout_s, left), out, env)
        if results[i].status == "timed out" and check.timeout_s > left:
            results[i].reason += f" (the rest of the {budget_s:.0f} s budget)"
        write_report(out, header, results)
        on_result(results[i])
    write_report(out, header, results)
    return results


def _figure(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_figure(x)}" for k, x in v.items())
    return str(v)


def write_report(out: Path, header: dict, results: list[Result]) -> None:
    """report.json (everything) and report.md (a status table, then each check's figures), written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    passed = sum(r.status == "passed" for r in results)
    doc = {**header, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "passed": passed, "total": len(results), "checks": [asdict(r) for r in results]}  # fmt: skip
    md = ["# GPU check", ""]
    md += [f"- {k}: {_figure(v)}" for k, v in header.items()]
    md += [f"- {passed} of {len(results)} checks passed", "", "| check | status | seconds | reason |",
           "| --- | --- | --- | --- |"]  # fmt: skip
    md += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.reason.replace('|', '/')} |" for r in results]
    for r in results:
        if r.figures:
            md += ["", f"## {r.name}: {r.title}", ""]
            for k, v in r.figures.items():
                if isinstance(v, str) and v.startswith("|"):  # a markdown table
                    md += ["", f"{k}:", "", v, ""]
                else:
                    md.append(f"- {k}: {_figure(v)}")
    for name, text in (("report.json", json.dumps(doc, indent=1, default=str)), ("report.md", "\n".join(md) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def install(wheelhouse: Path, site: Path, python: str) -> int:
    """Install every wheel of `wheelhouse` into `site` with no index and no dependency resolution (the
    wheelhouse already holds the closure the node lacks). Skipped when `site` holds exactly these wheels."""
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not wheels:
        raise CheckError(f"no wheels in {wheelhouse}; run `make wheelhouse` where the package index is reachable")
    stamp = site / ".wheels.json"
    want = [[w.name, w.stat().st_size] for w in wheels]
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return len(wheels)
    shutil.rmtree(site, ignore_errors=True)
    cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--quiet", "--target", str(site), *map(str, wheels)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["pip failed"]
        raise CheckError(f"installing {wheelhouse} into {site} failed: {err[0][:300]}")
    stamp.write_text(json.dumps(want))
    return len(wheels)


def cuda_probe(python: str, env: dict[str, str]) -> dict:
    """What the node's torch sees; CheckError (one line) when torch is missing or no CUDA device is there."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'devices': torch.cuda.device_count() if c else 0, "
            "'gpu': torch.cuda.get_device_name(0) if c else None}))")  # fmt: skip
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["?"]
        raise CheckError(f"{python} cannot import torch ({last[0][:200]}); the node must provide a CUDA build of torch")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not info["devices"]:
        visible = env.get("CUDA_VISIBLE_DEVICES", "unset")
        raise CheckError(f"no CUDA device: torch {info['torch']} (CUDA {info['cuda']}) sees none "
                         f"(CUDA_VISIBLE_DEVICES={visible}); run gpu-check on a GPU node")  # fmt: skip
    return info


def check_env(site: Path | None) -> dict[str, str]:
    """The checks' environment: the checkout first, then the private site folder, then the node's packages."""
    path = [str(ROOT)] + ([str(site)] if site else []) + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse", help="wheels from `make wheelhouse`")
    ap.add_argument("--no-install", action="store_true", help="use the packages this Python already has")
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_check", help="report folder (default: gpu_check/)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all checks (default: 480)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these checks only")
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except CheckError as e:
        print(f"compress-order: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    python = sys.executable
    checks = default_checks(python)
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in checks})
        if unknown:
            raise CheckError(f"unknown check {', '.join(unknown)}; valid: {', '.join(c.name for c in checks)}")
        checks = [c for c in checks if c.name in args.only]
    if args.budget <= 0:
        raise CheckError(f"--budget {args.budget:g}: give a positive number of seconds")
    args.out, args.wheelhouse = args.out.resolve(), args.wheelhouse.resolve()  # the checks run from the checkout
    site = None if args.no_install else args.out / "site"
    if site is not None and not sorted(args.wheelhouse.glob("*.whl")):
        raise CheckError(f"no wheels in {args.wheelhouse}; run `make wheelhouse` where the package index is reachable")
    env = {**check_env(site), "GPU_CHECK_OUT": str(args.out)}
    info = cuda_probe(python, env)  # before installing: no point without a GPU
    if site is not None:
        n = install(args.wheelhouse, site, python)
        print(f"installed {n} wheels from {args.wheelhouse} into {site}", flush=True)
    header = {"gpu": info["gpu"], "torch": info["torch"], "cuda": info["cuda"],
              "python": sys.version.split()[0], "budget_s": args.budget}  # fmt: skip

    def show(r: Result) -> None:
        print(f"{r.name:20s} {r.status:9s} {r.seconds:6.1f} s  {r.reason}", flush=True)

    results = run_checks(checks, args.budget, args.out, env, header, show)
    print(f"report: {args.out / 'report.md'} and report.json")
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
