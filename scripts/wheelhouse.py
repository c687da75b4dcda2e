"""Download the wheels an offline GPU node needs to run compress-order: the project's own and its runtime closure.

    python scripts/wheelhouse.py [--python-version 3.10] [--platform manylinux2014_x86_64]
                                 [--implementation cp] [--abi cp310] [--freeze node-freeze.txt] [--dest wheelhouse]

Runs where the package index is reachable. torch, torchvision, triton and the CUDA libraries (`nvidia-*`,
`cuda-*`) are never downloaded: the node brings its own build. With `--freeze` (the output of `pip freeze` on
the node), every requirement the node already satisfies is left out together with the dependencies only it
needed. pytest and pytest-timeout are added: `make gpu-check` runs the CUDA tests with them.

How: pip resolves the closure for the target (`pip install --dry-run --report`, metadata only), the selection
below walks that graph from the project's requirements, and `pip download --no-deps` fetches what was selected.
A dependency published only as a source archive is built here with `pip wheel` and must come out pure Python.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
# The node's own torch stack: never shipped, whatever the target has.
EXCLUDED = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton(-.*)?|nvidia-.*|cuda-.*)$")
# `make gpu-check` runs the test-suite's CUDA tests.
CHECK_REQUIREMENTS = ["pytest>=7", "pytest-timeout"]


class WheelhouseError(Exception):
    """Bad input or a resolution pip cannot make: reported as one line, exit 2."""


@dataclass
class Resolved:
    """One distribution pip chose for the target, with its declared requirements."""

    name: str  # canonical
    version: str
    requires: list[Requirement] = field(default_factory=list)
    url: str = ""


@dataclass
class Selection:
    download: list[Resolved]  # what the target lacks or has at an incompatible version
    from_node: dict[str, list[str]]  # excluded requirements the node must satisfy: name -> specifiers asked for
    kept_on_node: list[str]  # requirements the freeze already satisfies ("name==version")
    unresolved: list[str]  # requirements that hold for the target but pip did not resolve (marker mismatch)


def excluded(name: str) -> bool:
    return bool(EXCLUDED.match(canonicalize_name(name)))


def read_freeze(text: str) -> dict[str, Version | None]:
    """Installed versions from `pip freeze` output; None for direct references (`name @ url`) and local builds
    whose version is not PEP 440."""
    out: dict[str, Version | None] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):  # comments, `-e` editable checkouts, pip options
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        version = None
        pins = [s.version for s in req.specifier if s.operator in ("==", "===")]
        if pins:
            try:
                version = Version(pins[0])
            except InvalidVersion:
                version = None
        out[canonicalize_name(req.name)] = version
    return out


def satisfied(installed: Version | None, reqs: list[Requirement]) -> bool:
    """Whether an installed version meets every specifier asked of it (an unknown version meets only none)."""
    if installed is None:
        return all(not r.specifier for r in reqs)
    return all(r.specifier.contains(installed, prereleases=True) for r in reqs)


def _applies(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""})


def select(top: list[Requirement], resolved: dict[str, Resolved], freeze: dict[str, Version | None] | None,
           env: dict[str, str]) -> Selection:  # fmt: skip
    """Walk the resolved graph from `top`: a package is downloaded when it is not excluded and the freeze does not
    satisfy every requirement that the top level and the downloaded packages place on it. Dependencies of a
    package the node keeps (or of an excluded one) are the node's business and are not followed."""
    freeze = freeze or {}
    kept: set[str] = set()
    extras: dict[str, set[str]] = {}  # extras asked of each package: they switch on its `extra == ...` deps
    while True:  # edges only grow as `kept` grows, so this reaches a fixed point
        edges: dict[str, list[Requirement]] = {}
        asked: dict[str, set[str]] = {}
        for reqs, ex in [(top, set())] + [(resolved[n].requires, extras.get(n, set())) for n in sorted(kept)]:
            for r in reqs:
                if _applies(r, env, ex):
                    name = canonicalize_name(r.name)
                    edges.setdefault(name, []).append(r)
                    asked.setdefault(name, set()).update(r.extras)
        want = {n for n, rs in edges.items()
                if not excluded(n) and n in resolved and not (n in freeze and satisfied(freeze[n], rs))}  # fmt: skip
        if want == kept and asked == extras:
            break
        kept, extras = want, asked
    on_node = {n for n, rs in edges.items() if not excluded(n) and n in freeze and satisfied(freeze[n], rs)}
    return Selection(
        download=[resolved[n] for n in sorted(kept)],
        from_node={n: [str(r.specifier) for r in rs] for n, rs in sorted(edges.items()) if excluded(n)},
        kept_on_node=[f"{n}=={freeze[n]}" for n in sorted(on_node)],
        unresolved=sorted(n for n in edges if not excluded(n) and n not in resolved and n not in on_node),
    )


LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def expand_platforms(tags: list[str]) -> list[str]:
    """pip matches `--platform` tags literally: a glibc tag `manylinux_2_N_arch` is widened to every older glibc
    (down to 2.5) and its legacy alias, as a node with glibc 2.N accepts them all."""
    out: list[str] = []
    for tag in tags:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
        if not m:
            out.append(tag)
            continue
        minor, arch = int(m.group(1)), m.group(2)
        for v in range(minor, 4, -1):
            out.append(f"manylinux_2_{v}_{arch}")
            if v in LEGACY_MANYLINUX:
                out.append(f"{LEGACY_MANYLINUX[v]}_{arch}")
    return list(dict.fromkeys(out))


def target_environment(python_version: str | None, platform: str | None, implementation: str | None) -> dict:
    """Marker environment of the target: this interpreter's, with the Python version and platform replaced."""
    env = dict(default_environment())
    if python_version:
        parts = python_version.split(".")
        env["python_version"] = ".".join(parts[:2])
        env["python_full_version"] = python_version if len(parts) > 2 else f"{python_version}.0"
    if platform:
        for prefix, sys_platform, system in (("manylinux", "linux", "Linux"), ("musllinux", "linux", "Linux"),
                                             ("linux", "linux", "Linux"), ("macosx", "darwin", "Darwin"),
                                             ("win", "win32", "Windows")):  # fmt: skip
            if platform.startswith(prefix):
                env["sys_platform"], env["platform_system"] = sys_platform, system
                env["os_name"] = "nt" if system == "Windows" else "posix"
                break
        machine = re.search(r"(x86_64|aarch64|arm64|ppc64le|s390x|amd64|i686)$", platform)
        if machine:
            env["platform_machine"] = {"amd64": "AMD64"}.get(machine.group(1), machine.group(1))
    if implementation:
        env["implementation_name"] = {"cp": "cpython", "pp": "pypy"}.get(implementation, implementation)
        env["platform_python_implementation"] = {"cp": "CPython", "pp": "PyPy"}.get(implementation, implementation)
    return env


def wheel_requirements(wheel: Path) -> tuple[list[Requirement], list[str]]:
    """Requires-Dist and Provides-Extra of a built wheel: the project's requirements as packaged."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []], list(msg.get_all("Provides-Extra") or [])


def _pip(args: list[str], what: str) -> None:
    # This checkout's torch pin (PIP_CONSTRAINT, set by the Makefile) is not the node's.
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
        raise WheelhouseError(f"{what} failed: {' / '.join(lines)[:600]}")


def resolve(reqs: list[str], target_flags: list[str], constraints: list[str], find_links: Path) -> dict[str, Resolved]:
    """pip's resolution of `reqs` for the target, from package metadata only (nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report, cons = Path(tmp) / "report.json", Path(tmp) / "constraints.txt"
        cons.write_text("\n".join(constraints) + "\n")
        _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "-c", str(cons),
              "--find-links", str(find_links), *target_flags, *reqs], "resolving the requirements")  # fmt: skip
        items = json.loads(report.read_text())["install"]
    out = {}
    for it in items:
        meta = it["metadata"]
        name = canonicalize_name(meta["name"])
        out[name] = Resolved(name, meta["version"], [Requirement(r) for r in meta.get("requires_dist") or []],
                             it["download_info"]["url"])  # fmt: skip
    return out


def _is_pure(wheel: Path) -> bool:
    return wheel.name.endswith("-none-any.whl")


def build_source_only(reqs: list[str], dest: Path, constraints: list[str]) -> dict[str, list[Path]]:
    """Wheels for the dependencies published only as source archives (resolved for this interpreter, where
    building is allowed). They must be pure Python to serve another platform."""
    here = resolve(reqs, [], constraints, dest)
    built = {}
    for r in here.values():
        if r.url.endswith((".tar.gz", ".zip", ".tar.bz2")) and not excluded(r.name):
            before = set(dest.glob("*.whl"))
            _pip(["wheel", "--no-deps", "--quiet", "-w", str(dest), f"{r.name}=={r.version}"], f"building {r.name}")
            new = set(dest.glob("*.whl")) - before
            if any(not _is_pure(w) for w in new):
                raise WheelhouseError(f"{r.name} {r.version} has no wheel on the index and builds to a platform "
                                      "wheel here; build it on a machine like the node")  # fmt: skip
            built[r.name] = sorted(new)
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python-version", help="target Python, e.g. 3.10 (default: this interpreter's)")
    ap.add_argument("--platform", action="append", help="target platform tag, repeatable, e.g. manylinux_2_28_x86_64 "
                    "(glibc 2.28 and older; default: this machine's)")  # fmt: skip
    ap.add_argument("--implementation", help="target implementation tag, e.g. cp (default: this interpreter's)")
    ap.add_argument("--abi", action="append", help="target ABI tag, repeatable, e.g. cp310 (default: derived by pip)")
    ap.add_argument("--freeze", type=Path, help="`pip freeze` of the target: leave out what it already satisfies")
    ap.add_argument("--extra", action="append", default=[], help="also the project's optional extra NAME")
    ap.add_argument("--dest", type=Path, default=ROOT / "wheelhouse", help="output folder (default: wheelhouse/)")
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except WheelhouseError as e:
        print(f"compress-order: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.freeze is not None and not args.freeze.is_file():
        raise WheelhouseError(f"--freeze {args.freeze}: no such file")
    if args.python_version and not re.fullmatch(r"3(\.\d+){1,2}", args.python_version):
        raise WheelhouseError(f"--python-version {args.python_version}: give a Python 3 version, e.g. 3.10")
    freeze = read_freeze(args.freeze.read_text()) if args.freeze else None
    flags = ["--only-binary=:all:"]
    for opt, values in (
        ("--python-version", [args.python_version] if args.python_version else []),
        ("--platform", expand_platforms(args.platform or [])),
        ("--implementation", [args.implementation] if args.implementation else []),
        ("--abi", args.abi or []),
    ):
        for v in values:
            flags += [opt, v]
    env = target_environment(args.python_version, (args.platform or [None])[0], args.implementation)

    dest = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one target per wheelhouse: gpu-check installs every wheel in it
        old.unlink()
    _pip(["wheel", "--no-deps", "--quiet", "-w", str(dest), str(ROOT)], "building the project's wheel")
    project = next(dest.glob("compress_order-*.whl"))
    requires, extras = wheel_requirements(project)
    unknown = sorted(set(args.extra) - set(extras))
    if unknown:
        raise WheelhouseError(f"unknown extra {', '.join(unknown)}; valid: {', '.join(extras)}")
    top = [r for r in requires if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in args.extra)]
    top += [Requirement(r) for r in CHECK_REQUIREMENTS]
    reqs = [str(r) for r in top if not excluded(r.name)]  # excluded ones are pulled in anyway, as metadata only
    # Resolve around the node's own versions of the project's direct requirements when they are compatible: their
    # requirements then bound everything else (a node's transformers keeps its huggingface-hub range).
    direct = {canonicalize_name(r.name): r for r in top}
    pins = [f"{n}=={v}" for n, v in (freeze or {}).items() if n in direct and v is not None and not excluded(n)
            and not v.local and satisfied(v, [direct[n]])]  # fmt: skip

    print(f"building wheels of source-only dependencies into {dest} ...", flush=True)
    built = build_source_only(reqs, dest, [])
    shown = " ".join(f"{k}={v}" for k, v in (("python", args.python_version), ("platform", args.platform),
                                             ("abi", args.abi)) if v)  # fmt: skip
    print(f"resolving {len(reqs)} requirements for the target ({shown or 'this machine'}) ...", flush=True)
    try:
        resolved = resolve(reqs, flags, pins, dest)
    except WheelhouseError as e:
        print(f"  warning: the node's {', '.join(pins)} do not fit together with the rest ({str(e)[:300]}); "
              "resolving without them", flush=True)  # fmt: skip
        pins = []
        resolved = resolve(reqs, flags, pins, dest)
    sel = select(top, resolved, freeze, env)
    if sel.unresolved:  # markers pip evaluated for this interpreter, not the target's: resolve those too
        resolved = {**resolve(reqs + sel.unresolved, flags, pins, dest), **resolved}
        sel = select(top, resolved, freeze, env)

    for name in set(built) - {r.name for r in sel.download}:  # the target has it: the wheel was only for resolving
        for w in built[name]:
            w.unlink()
    names = [f"{r.name}=={r.version}" for r in sel.download if r.name not in built]
    if names:
        print(f"downloading {len(names)} wheels ...", flush=True)
        _pip(["download", "--no-deps", "--quiet", "-d", str(dest), *flags, *names], "downloading wheels")
    wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    manifest = {
        "target": {"python_version": args.python_version or sysconfig.get_python_version(),
                   "platform": args.platform or [sysconfig.get_platform()], "implementation": args.implementation,
                   "abi": args.abi, "freeze": str(args.freeze) if args.freeze else None},
        "wheels": [w.name for w in wheels],
        "from_node": sel.from_node, "kept_on_node": sel.kept_on_node, "total_bytes": total,
    }  # fmt: skip
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if sel.kept_on_node:
        print(f"left out (the node has them): {', '.join(sel.kept_on_node)}")
    print("the node must provide: " + ", ".join(f"{n}{','.join(s)}" for n, s in sel.from_node.items()))
    print(f"{dest}: {len(wheels)} wheels, {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
